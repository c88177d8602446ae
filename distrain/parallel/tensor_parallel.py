"""Tensor and sequence parallelism from the model's own plan (`config.base_model_tp_plan`).

The plan's keys (module patterns relative to the base model) and styles are read as data and
mapped onto shardings of the parameters (DTensors on the TP mesh: FSDP, checkpoints and the plan
read their placements). The linear projections compute on their local shards with explicit
functional collectives where the layout changes (`_Move`), as Megatron does: DTensor's dispatch of
every op cost about 20% of a small TP step. No TP collective goes through DTensor: torch's
DTensor styles issue asynchronous functional collectives, and one of them (a rowwise
reduce-scatter under SP on gloo) crashed a rank in native code at random steps.

- "colwise": weight (and bias) sharded on the output features; input replicated.
- "rowwise": weight sharded on the input features; output all-reduced to replicated, or with SP
  reduce-scattered onto the sequence dimension.
- "replicated_with_grad_allreduce": a replicated parameter that only sees this rank's heads
  (Qwen3's q_norm/k_norm), so its gradient is partial and summed over the TP ranks.
- "colwise_gather_output" / "rowwise_split_input": fused projections the model slices by global
  sizes (Phi-3's qkv_proj and gate_up_proj): the colwise output is all-gathered, the code between
  runs on the full features on every TP rank, and the rowwise projection takes its slice of them.
- "packed_colwise" on an experts module's 3-D `gate_up_proj` ([experts, 2 x intermediate, hidden],
  gate rows then up rows): each rank holds its slice of the gate rows and of the up rows
  (`_StridedShard(dim, split_factor=2)`), so `chunk(2)` of its local output is its gate and up;
  "rowwise" on `down_proj` shards the intermediate dimension. "moe_tp_experts" on the experts
  module: distrain's experts layer (`distrain.moe.experts`) runs on the local shards, so every
  rank computes every expert's partial output for all tokens (expert-TP). The MoE block around it (router + experts) is one region:
  entered like a colwise projection (sequence all-gathered under SP; gradient summed over TP),
  left like a rowwise one (partial output all-reduced, or reduce-scattered onto the sequence);
  the router's gradient is partial and summed over TP. A shared expert inside the block is sharded
  colwise / rowwise with its output left partial ("colwise_partial" / "rowwise_partial").

Models that declare no plan get a structural one (`structural_plan`): in each attention / MLP
module of a block, the linear projections that read the module's input are colwise and the last
one, which writes the hidden size back, rowwise; attribute head counts are set to the local ones.

The embedding is sharded on the vocabulary (rowwise); the lm_head on the vocabulary too
(colwise), and its logits stay sharded: cross-entropy runs on the shards without ever gathering
the full vocabulary, in one collective (`vocab_parallel_cross_entropy`).

Sequence parallelism (SP). Between blocks the residual stream is this rank's slice of the
sequence, [B, S/tp, D], as a plain tensor: norms and residual adds run on it locally. The
sequence is split before the first block (a local slice); each module that holds colwise
projections all-gathers the sequence on entry (reduce-scatters its gradient), and rowwise
projections reduce-scatter their output back onto the sequence. The lm_head all-gathers the
final slice. Position ids and masks are built by the base model for the full sequence before the
first block, so every rank's attention sees correct positions and document masks. Parameters
outside the TP plan then see only part of the sequence: their gradients are partial and summed
over the TP ranks, like q_norm/k_norm's.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from distrain.config.schema import ConfigError
from distrain.models import ModelSpec, keep_tied

MODULE_STYLES = (
    "colwise", "colwise_gather_output", "rowwise", "rowwise_split_input", "replicated_with_grad_allreduce",
    "moe_tp_experts", "embedding_rowwise",
)
PARAMETER_STYLES = ("colwise", "packed_colwise", "rowwise")  # on an experts module's 3-D weights


def resolved_plan(model: nn.Module, spec: ModelSpec, tp: int, moe_outside: bool = False) -> dict[str, str]:
    """Module or parameter FQN -> style, for everything the model's TP plan names (or the
    structural plan, for a model that declares none); every dimension it shards must divide by
    `tp`. `moe_outside` (expert parallelism): the MoE modules are left out of TP."""
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    outside = [b.name for b in spec.moe_blocks] if moe_outside else []
    # NOTE: the structural plan gives MoE modules no entries (it refuses those holding linears)
    resolved = _declared_plan(model, spec, plan, outside) if plan else structural_plan(model, spec)
    _check_divisible(model, resolved, tp)
    return resolved


def _whole_attention(names: dict[nn.Module, str], spec: ModelSpec, plan: dict[str, str]) -> list[str]:
    """The attention modules of the blocks that the plan shards no projection of (DeepSeek-V3's
    MLA): every TP rank runs them whole. `names`: module -> its name in the model."""
    attention = [f"{names[block]}.{child}" for block in spec.blocks for child, role in spec.roles.items() if role == "attention"]
    return [name for name in attention if not any(n.startswith(f"{name}.") and s.startswith("colwise") for n, s in plan.items())]


def _declared_plan(model: nn.Module, spec: ModelSpec, plan: dict[str, str], outside: list[str]) -> dict[str, str]:
    prefix = model.base_model_prefix
    patterns = [(re.compile("^" + re.escape(f"{prefix}.{key}").replace(r"\*", r"\d+") + "$"), style) for key, style in plan.items()]
    modules = dict(model.named_modules())
    resolved = {}
    for name in [*modules, *(n for n, _ in model.named_parameters())]:
        if any(name == m or name.startswith(m + ".") for m in outside):
            continue
        for pattern, style in patterns:
            if pattern.match(name):
                resolved[name] = style
    unsupported = sorted({
        style for name, style in resolved.items() if style not in (MODULE_STYLES if name in modules else PARAMETER_STYLES)
    })
    if unsupported:
        raise ConfigError(
            f"parallel.tp>1: {type(model).__name__}'s TP plan uses styles distrain does not map yet: "
            f"{', '.join(unsupported)} (mapped: {', '.join(sorted(set(MODULE_STYLES + PARAMETER_STYLES)))}); use parallel.tp=1"
        )
    for name, style in resolved.items():
        if name not in modules and resolved.get(name.rsplit(".", 1)[0]) != "moe_tp_experts":
            raise ConfigError(
                f"parallel.tp>1: {type(model).__name__}'s TP plan shards parameter {name} ({style}) outside an experts "
                "module; distrain maps parameter styles only on moe_tp_experts modules; use parallel.tp=1"
            )
    moe_blocks = {f"{b.name}.{b.experts_name}": b for b in spec.moe_blocks}
    for name, style in list(resolved.items()):
        if style == "moe_tp_experts":
            if name not in moe_blocks:
                raise ConfigError(
                    f"parallel.tp>1: {type(model).__name__}'s TP plan runs {name} as experts (moe_tp_experts), but distrain found "
                    "no MoE block there (fused 3-D expert weights beside a router); use parallel.tp=1"
                )
            resolved.update(_moe_region_plan(model, resolved, moe_blocks[name]))
    return resolved


def _sharded_sizes(modules: dict[str, nn.Module], name: str, style: str) -> list[tuple[str, int]]:
    """(what, size) of each dimension `style` shards on module or parameter `name`."""
    module = modules.get(name)
    if isinstance(module, nn.Linear) and style != "replicated_with_grad_allreduce":
        return [("output features", module.out_features)] if style.startswith("colwise") else [("input features", module.in_features)]
    if module is None:  # an experts module's 3-D weight
        experts_name, param_name = name.rsplit(".", 1)
        experts = modules[experts_name]
        shape = getattr(experts, param_name).shape
        out_dim, in_dim = (-1, -2) if getattr(experts, "is_transposed", False) else (-2, -1)
        if style == "rowwise":
            return [("intermediate size", shape[in_dim])]
        return [("intermediate size", shape[out_dim] // (2 if style == "packed_colwise" else 1))]
    return []


def _check_divisible(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    modules = dict(model.named_modules())
    for name, style in plan.items():
        for what, size in _sharded_sizes(modules, name, style):
            if size % tp:
                working = max(d for d in range(1, tp + 1) if size % d == 0)
                raise ConfigError(
                    f"parallel.tp={tp} does not divide the {size} {what} of {name} ({style}); e.g. parallel.tp={working}"
                )


def _linear_children(module: nn.Module) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """`module`'s direct linear projections in declaration order, and the names of its other
    children (or own parameters) that hold parameters."""
    linears = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]
    others = sorted({n.split(".")[0] for n, _ in module.named_parameters() if n.split(".")[0] not in dict(linears)})
    return linears, others


def _moe_region_plan(model: nn.Module, plan: dict[str, str], block) -> dict[str, str]:
    """The MoE block around an experts module (`block`, as `ModelSpec` discovered it) is one TP
    region whose output stays partial until it leaves, so everything in it that adds to the
    output must be partial too: the experts, and a shared expert, sharded here colwise / rowwise
    with a partial output (linear projections hidden -> intermediate -> hidden, no bias on the
    last). The router and a shared expert's gate never write the hidden size: they stay whole,
    their gradients partial. Returns the plan entries of the shared expert."""
    entries = {}
    if block.shared_expert is not None:
        shared_name = next(n for n, m in block.module.named_children() if m is block.shared_expert)
        linears, others = _linear_children(block.shared_expert)
        *inputs, (out_name, out) = linears
        hidden = model.config.hidden_size
        if others or out.bias is not None or any(m.in_features != hidden for _, m in inputs):
            raise ConfigError(
                f"parallel.tp>1: {type(model).__name__}'s shared expert {block.name}.{shared_name} is not linear projections "
                "hidden -> intermediate -> hidden without an output bias; expert-TP of such blocks is not mapped yet; use parallel.tp=1"
            )
        entries.update({f"{block.name}.{shared_name}.{n}": "colwise_partial" for n, _ in inputs})
        entries[f"{block.name}.{shared_name}.{out_name}"] = "rowwise_partial"
    experts_name = f"{block.name}.{block.experts_name}"
    not_3d = sorted(n for n, p in block.experts.named_parameters() if p.ndim != 3)
    if not_3d:
        raise ConfigError(
            f"parallel.tp>1: {experts_name} holds parameters that are not 3-D expert weights ({', '.join(not_3d)}, e.g. "
            "expert biases); expert-TP does not map them yet; use parallel.tp=1"
        )
    unplanned = sorted(n for n, _ in block.experts.named_parameters() if f"{experts_name}.{n}" not in plan)
    if unplanned:
        raise ConfigError(
            f"parallel.tp>1: the TP plan does not say how to shard {experts_name}'s {', '.join(unplanned)}; use parallel.tp=1"
        )
    return entries


def structural_plan(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """A plan by module role for a model that declares none, read from the first block: in each
    child module holding linear projections (attention, MLP), those reading the module's input
    (hidden size in) are colwise and the last one declared, writing the hidden size back, is
    rowwise. Fused projections cannot be told apart from plain ones by shape: a module with one
    input projection is mapped only as an MLP (its output the config's intermediate size)."""
    config = model.config
    hidden = config.hidden_size
    blocks_name = next(name for name, module in model.named_modules() if module is spec.blocks)
    plan = {}
    for child_name, child in spec.blocks[0].named_children():
        linears, others = _linear_children(child)
        if not linears:
            continue
        if others:
            # e.g. per-head norms that index global heads: sharding the heads would misalign them
            raise ConfigError(
                f"parallel.tp>1: {type(model).__name__} declares no TP plan and its {child_name} module holds parameters "
                f"besides its linear projections ({', '.join(others)}); the structural plan does not shard those; use parallel.tp=1"
            )
        *inputs, (out_name, out) = linears
        mlp = getattr(config, "intermediate_size", None)
        if (
            out.out_features != hidden
            or not inputs
            or any(m.in_features != hidden for _, m in inputs)
            or (len(inputs) == 1 and inputs[0][1].out_features != mlp)
        ):
            raise ConfigError(
                f"parallel.tp>1: {type(model).__name__} declares no TP plan and its {child_name} module does not read as "
                "attention or MLP projections (hidden -> ... -> hidden, no fused projection); use parallel.tp=1"
            )
        for n, _ in inputs:
            plan[f"{child_name}.{n}"] = "colwise"
        plan[f"{child_name}.{out_name}"] = "rowwise"
    if not plan:
        raise ConfigError(f"parallel.tp>1: {type(model).__name__} declares no TP plan and no linear projections were found; use parallel.tp=1")
    return {f"{blocks_name}.{i}.{key}": style for i in range(len(spec.blocks)) for key, style in plan.items()}


def _localize_head_counts(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Structural plan: attention modules that shape their activations with attribute head counts
    (`self.num_heads`) get this rank's counts."""
    config = model.config
    heads = {config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for parent in {name.rsplit(".", 1)[0] for name in plan}:
        module = model.get_submodule(parent)
        for attr, value in list(vars(module).items()):
            if "heads" in attr and isinstance(value, int) and value in heads:
                setattr(module, attr, value // tp)


def apply_tensor_parallel(model: nn.Module, spec: ModelSpec, tp_mesh, sp: bool, ep: bool = False) -> list[str]:
    """Shard the model over `tp_mesh`; return the FQNs of parameters whose gradients are partial
    over the TP ranks (to be summed after backward). With expert parallelism (`ep`) the MoE
    modules stay out of TP: each TP rank runs its MoE modules on its own slice of the sequence
    (under SP it has one; without, the slice is taken on entry and the outputs all-gathered on
    exit), so their router and shared expert see a share of the tokens (partial gradients)."""
    plan = resolved_plan(model, spec, tp_mesh.size(), moe_outside=ep)
    if not getattr(model.config, "base_model_tp_plan", None):
        _localize_head_counts(model, plan, tp_mesh.size())
    modules = dict(model.named_modules())
    gather_points, regions, partial_modules, sliced_biases = set(), [], [], []
    for name, style in plan.items():
        parent = name.rsplit(".", 1)[0]
        if name not in modules:
            continue  # experts' parameters: sharded with their module below
        if style in ("colwise", "colwise_gather_output"):
            _shard_linear(modules[name], style, tp_mesh, sp)
            gather_points.add(parent)
        elif style in ("rowwise", "rowwise_split_input"):
            _shard_linear(modules[name], style, tp_mesh, sp)
            if sp and modules[name].bias is not None:
                sliced_biases.append(f"{name}.bias")  # added to this rank's slice of the sequence
        elif style == "replicated_with_grad_allreduce":
            partial_modules.append(name)
        elif style == "moe_tp_experts":
            _shard_experts(modules[name], name, plan, tp_mesh)
            regions.append(parent)
        elif style in ("colwise_partial", "rowwise_partial"):  # a shared expert inside an MoE region
            linear = modules[name]
            for param_name, _ in list(linear.named_parameters(recurse=False)):
                _distribute_parameter(linear, param_name, Shard(0) if style == "colwise_partial" else Shard(1), tp_mesh)
            _run_on_local_shards(linear)
    names = {module: name for name, module in modules.items()}
    # NOTE: a tied embedding / lm_head weight is sharded the same way by both (vocab on dim 0);
    #       the second distribute wraps it in a new Parameter, so the tie is restored.
    with keep_tied(model):
        _shard_embedding(spec.embeddings, tp_mesh)
        _shard_lm_head(spec.lm_head, tp_mesh, sp)

    # NOTE: a module whose colwise projections share one input (q/k/v, gate/up), or an expert-TP
    #       MoE block (router and experts all read it), gets that input whole on every rank. Its
    #       gradient comes back partial from every projection (each rank's heads or experts), is
    #       summed locally, and is reduced once. A block's partial output is reduced on leaving.
    for name in gather_points:
        modules[name].register_forward_pre_hook(_MoveInput(tp_mesh, _ENTER[sp]), with_kwargs=True)
    # NOTE: an attention module left whole attends over the whole sequence on every TP rank (as
    #       without SP): under SP its input is gathered and its output sliced again, so its
    #       gradients are whole copies on every TP rank
    whole = _whole_attention(names, spec, plan) if sp else []
    for name in whole:
        modules[name].register_forward_pre_hook(_MoveInput(tp_mesh, _GATHER), with_kwargs=True)
        modules[name].register_forward_hook(_MoveOutput(tp_mesh, _SPLIT))
    for name in regions:
        modules[name].register_forward_pre_hook(_MoveInput(tp_mesh, _ENTER[sp]), with_kwargs=True)
        modules[name].register_forward_hook(_MoveOutput(tp_mesh, _LEAVE[sp]))
        partial_modules.append(name)
    # NOTE: with EP the experts' weights (sharded over EP next) get their gradients whole from the
    #       all-to-all: never summed over TP
    experts = {f"{b.name}.{b.experts_name}." for b in spec.moe_blocks} if ep else set()
    if ep and not sp:
        for block in spec.moe_blocks:
            block.module.register_forward_pre_hook(_MoveInput(tp_mesh, _SPLIT), with_kwargs=True)
            block.module.register_forward_hook(_MoveOutput(tp_mesh, _GATHER))
            partial_modules.append(block.name)
    partial = [f"{m}.{p}" for m in partial_modules for p, param in modules[m].named_parameters() if not isinstance(param, DTensor)]
    partial += sliced_biases
    if sp:
        # NOTE: under SP what runs outside the modules entered above (norms of the residual stream,
        #       MoE blocks outside TP) sees this rank's slice of the sequence: partial gradients;
        #       inside them it sees the whole sequence, as without SP (e.g. OLMoE's q_norm over the
        #       gathered projection output: a whole gradient on every rank, a copy)
        spec.blocks[0].register_forward_pre_hook(_MoveInput(tp_mesh, _SPLIT), with_kwargs=True)
        entered = tuple(f"{m}." for m in (*gather_points, *regions, *whole))
        partial += [n for n, p in model.named_parameters() if not isinstance(p, DTensor) and not n.startswith(entered) and n not in partial]
    return [n for n in partial if not any(n.startswith(e) for e in experts)]


def _shard_experts(experts: nn.Module, name: str, plan: dict[str, str], tp_mesh) -> None:
    """Shard an experts module's 3-D weights on their intermediate dimension (see the module
    docstring); distrain's experts layer runs on the local shards (expert-TP)."""
    transposed = getattr(experts, "is_transposed", False)
    for param_name, param in list(experts.named_parameters(recurse=False)):
        style = plan[f"{name}.{param_name}"]
        out_dim, in_dim = (param.ndim - 1, param.ndim - 2) if transposed else (param.ndim - 2, param.ndim - 1)
        if style == "rowwise":
            placement = Shard(in_dim)
        elif style == "packed_colwise" and getattr(experts, "is_concatenated", True):
            placement = _StridedShard(out_dim, split_factor=2)  # [gate; up]: a slice of each
        else:  # colwise, or packed with gate and up interleaved row by row: contiguous pairs
            placement = Shard(out_dim)
        _distribute_parameter(experts, param_name, placement, tp_mesh)


def _shard_linear(linear: nn.Linear, style: str, tp_mesh, sp: bool) -> None:
    """Megatron's column / row parallel linear on plain tensors: the parameters are DTensors
    (for FSDP, checkpoints and the plan), the forward runs `F.linear` on their local shards, and
    the collectives are explicit (`_Move`), which spares the DTensor dispatch of every op.
    colwise: weight and bias sharded on the output features; the input comes replicated (entered
    once per module by a `_MoveInput` hook); "colwise_gather_output" all-gathers the features.
    rowwise: weight sharded on the input features; its partial output is all-reduced, or
    reduce-scattered onto the sequence under SP, and a bias (replicated) is added once, after
    that (under SP to this rank's slice: its gradient is partial over TP); "rowwise_split_input"
    first takes this rank's slice of a replicated input."""
    colwise = style.startswith("colwise")
    for param_name, _ in list(linear.named_parameters(recurse=False)):
        placement = Shard(0) if colwise else Replicate() if param_name == "bias" else Shard(1)
        _distribute_parameter(linear, param_name, placement, tp_mesh)
    if colwise:
        _run_on_local_shards(linear)
    else:
        def rowwise(x):
            out = _move(F.linear(x, linear.weight.to_local()), *_LEAVE[sp], 1, tp_mesh)
            return out if linear.bias is None else out + linear.bias.to_local()

        linear.forward = rowwise
    if style == "colwise_gather_output":
        linear.register_forward_hook(_MoveOutput(tp_mesh, _GATHER, dim=-1))
    if style == "rowwise_split_input":
        linear.register_forward_pre_hook(_MoveInput(tp_mesh, _SPLIT, dim=-1), with_kwargs=True)


def _shard_lm_head(head: nn.Linear, tp_mesh, sp: bool) -> None:
    """The lm_head colwise on the vocabulary: it enters the whole sequence (all-gathered under
    SP) and its logits stay sharded, handed on as a DTensor `Shard(-1)` (no collective: the loss
    reads the local shard, `vocab_parallel_cross_entropy`)."""
    _shard_linear(head, "colwise", tp_mesh, sp)
    head.register_forward_pre_hook(_MoveInput(tp_mesh, _ENTER[sp]), with_kwargs=True)
    head.register_forward_hook(lambda module, args, out: DTensor.from_local(out, tp_mesh, [Shard(-1)], run_check=False))


def _shard_embedding(embedding: nn.Embedding, tp_mesh) -> None:
    """Vocabulary-parallel embedding on the local shard: each rank holds a range of the rows
    (`Shard(0)`), looks up the ids in its range (the others give zero rows), and the partial rows
    are all-reduced, a plain tensor out (DTensor's style hands compiled blocks an async wrapper
    whose gradient they dropped). The module's own forward runs (e.g. Gemma's scale)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _distribute_parameter(embedding, "weight", Shard(0), tp_mesh)
    (rows, _), (start, _) = compute_local_shape_and_global_offset(embedding.weight.shape, tp_mesh, [Shard(0)])
    pad = embedding.padding_idx
    local_pad = pad - start if pad is not None and start <= pad < start + rows else None
    _run_on_local_shards(embedding)
    local_forward = embedding.forward

    def vocab_parallel(ids, *args, **kwargs):
        mine = (ids >= start) & (ids < start + rows)
        embedding.padding_idx = local_pad  # the global padding row, if this rank holds it
        try:
            out = local_forward(torch.where(mine, ids - start, 0), *args, **kwargs)
        finally:
            embedding.padding_idx = pad
        return _move(out.masked_fill(~mine.unsqueeze(-1), 0), *_LEAVE[False], -1, tp_mesh)  # partial rows, summed

    embedding.forward = vocab_parallel


def _distribute_parameter(module: nn.Module, name: str, placement, tp_mesh) -> None:
    """Replace `module`'s (meta) parameter `name` by a DTensor parameter placed on `tp_mesh`."""
    param = module._parameters[name]
    sharded = distribute_tensor(param, tp_mesh, [placement], src_data_rank=None)
    module._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)


def _run_on_local_shards(module: nn.Module) -> None:
    """Run `module`'s own forward on the local shards of its DTensor parameters (plain tensors:
    the result is this rank's partial output); gradients flow back to the DTensor parameters."""
    forward = module.forward

    def on_local_shards(*args, **kwargs):
        held = dict(module._parameters)
        module._parameters.update({n: p.to_local() for n, p in held.items() if isinstance(p, DTensor)})
        try:
            return forward(*args, **kwargs)
        finally:
            module._parameters.update(held)

    module.forward = on_local_shards


def is_packed(tensor) -> bool:
    """Whether `tensor` is a DTensor holding a packed TP shard (see `contiguous_placements`)."""
    return isinstance(tensor, DTensor) and contiguous_placements(tensor.placements) != list(tensor.placements)


def contiguous_placements(placements) -> list:
    """`placements` with every packed TP shard (a `_StridedShard` no later mesh dim shards
    further, so its local data are several boxes of the full tensor) made a plain `Shard`: the
    layout tools that slice one box per rank (DCP, state-dict loading) can handle. FSDP's own
    `_StridedShard` over a TP `Shard` of the same dim is one box and stays."""
    result = list(placements)
    for i, p in enumerate(result):
        if isinstance(p, _StridedShard) and not any(isinstance(q, Shard) and q.dim == p.dim for q in result[i + 1 :]):
            result[i] = Shard(p.dim)
    return result


def _first_tensor(args, kwargs):
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})


def _collective(kind: str, x: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    """One TP collective (or its local counterpart) on dimension `dim` of a plain tensor, as a
    functional collective (what DTensor issues: the op counters and selective checkpointing see it)."""
    if kind == "identity":
        return x
    ops, group = torch.ops._c10d_functional, mesh.get_group()
    size, name = group.size(), group.group_name
    if kind == "slice":
        return x.chunk(size, dim)[mesh.get_local_rank()].contiguous()
    if kind == "all_reduce":
        return ops.wait_tensor(ops.all_reduce(x.contiguous(), "sum", name))
    front = x.movedim(dim, 0).contiguous()  # the collectives gather and scatter dimension 0
    if kind == "all_gather":
        out = ops.wait_tensor(ops.all_gather_into_tensor(front, size, name))
    else:
        out = ops.wait_tensor(ops.reduce_scatter_tensor(front, "sum", size, name))
    return out.movedim(0, dim).contiguous()


class _Move(torch.autograd.Function):
    """A tensor's move between TP layouts: `forward` in forward, `backward` on its gradient
    (each a `_collective` kind: the pairs are adjoint, e.g. all-reduce / identity)."""

    @staticmethod
    def forward(ctx, x, forward: str, backward: str, dim: int, mesh):
        ctx.backward_kind, ctx.dim, ctx.mesh = backward, dim, mesh
        return _collective(forward, x, dim, mesh)

    @staticmethod
    def backward(ctx, grad):
        return _collective(ctx.backward_kind, grad, ctx.dim, ctx.mesh), None, None, None, None


def _move(x: torch.Tensor, forward: str, backward: str, dim: int, mesh) -> torch.Tensor:
    return _Move.apply(x, forward, backward, dim, mesh)


# (forward, backward) collective kinds of TP's layout moves, by whether SP is on
_ENTER = {False: ("identity", "all_reduce"), True: ("all_gather", "reduce_scatter")}  # into a region every rank computes whole
_LEAVE = {False: ("all_reduce", "identity"), True: ("reduce_scatter", "all_gather")}  # a partial output out of it
_SPLIT = ("slice", "all_gather")  # a replicated tensor to this rank's slice
_GATHER = ("all_gather", "slice")  # a slice to the whole tensor


class _MoveInput:
    """Forward pre-hook (with kwargs): move a module's first input (or `hidden_states`) between
    TP layouts on dimension `dim` (the sequence by default)."""

    def __init__(self, mesh, kinds: tuple[str, str], dim: int = 1):
        self.mesh, self.kinds, self.dim = mesh, kinds, dim

    def __call__(self, module, args, kwargs):
        x, rebuild = _first_tensor(args, kwargs)
        return rebuild(_move(x, *self.kinds, self.dim, self.mesh))


class _MoveOutput(_MoveInput):
    """Forward hook: move a module's output (or the first tensor of its output tuple)."""

    def __call__(self, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        moved = _move(first, *self.kinds, self.dim, self.mesh)
        return (moved, *output[1:]) if isinstance(output, tuple) else moved


class TPGrads(NamedTuple):
    """What `sync_tp_grads` does to gradients after backward (names of parameters): `partial` ones
    (computed by each TP rank from only its heads or its slice of the sequence) are summed over the
    TP ranks; `copies` (parameters TP leaves whole whose gradients TP made whole: every TP rank
    holds the same) were summed over the TP ranks by FSDP's reduce-scatter with the partial
    ones, and are divided by the TP size."""

    partial: list[str]
    copies: list[str]


def sync_tp_grads(model: nn.Module, grads: TPGrads, tp_group) -> None:
    """After backward: sum over the TP ranks the gradients that each rank computed from only its
    heads or its slice of the sequence, divide by the TP size those FSDP summed over identical
    copies (`TPGrads`), and give every sharded gradient its parameter's placement (a gradient
    DTensor's ops return replicated is sliced locally, no traffic)."""
    params = dict(model.named_parameters())
    for param in params.values():
        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
            param.grad = param.grad.redistribute(placements=param.placements)
    size = torch.distributed.get_world_size(tp_group)
    for name in grads.copies:
        grad = params[name].grad
        if grad is not None:
            (grad.to_local() if isinstance(grad, DTensor) else grad).div_(size)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in (params[n].grad for n in grads.partial) if g is not None]
    if not local:
        return
    flat = torch.cat([g.reshape(-1) for g in local])
    torch.distributed.all_reduce(flat, group=tp_group)
    offset = 0
    for g in local:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def vocab_parallel_cross_entropy(logits: DTensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed cross-entropy of logits sharded on the vocabulary over the TP ranks (the lm_head's
    output, `Shard(-1)`), never gathering the vocabulary, in one collective: each rank all-gathers
    its per-token [log-sum-exp of its shard, target logit or 0] (2 floats per token), and every
    rank combines them (the log-sum-exp over ranks of the shards' ones). torch's `loss_parallel`
    spends three all-reduces on (max, sum-exp, target). Backward needs no collective:
    softmax(x) - onehot on the local shard. Returns a plain tensor, the same on every TP rank."""
    (placement,) = logits.placements
    assert placement.is_shard() and placement.dim in (-1, logits.dim() - 1), f"logits sharded as {logits.placements}"
    mesh = logits.device_mesh
    local = logits.to_local()
    vocab_start = local.shape[-1] * mesh.get_local_rank()  # Shard: equal shards (the vocab divides by tp)
    return _VocabParallelCE.apply(local.flatten(0, -2).float(), labels.flatten(), vocab_start, ignore_index, mesh.get_group())


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, labels, vocab_start: int, ignore_index: int, group):
        import torch.distributed as dist

        local_vocab = local.shape[-1]
        offset = labels - vocab_start
        here = (offset >= 0) & (offset < local_vocab)
        index = offset.clamp(0, local_vocab - 1)[:, None]
        target = torch.where(here, local.gather(-1, index).squeeze(-1), 0.0)
        stats = torch.stack([torch.logsumexp(local, dim=-1), target])
        gathered = torch.empty((dist.get_world_size(group) * 2, stats.shape[1]), dtype=stats.dtype, device=stats.device)
        dist.all_gather_single(gathered, stats, group=group)
        gathered = gathered.view(-1, 2, stats.shape[1])
        log_sum_exp = torch.logsumexp(gathered[:, 0], dim=0)
        valid = labels != ignore_index
        ctx.save_for_backward(local, log_sum_exp, index, here & valid, valid)
        return torch.where(valid, log_sum_exp - gathered[:, 1].sum(dim=0), 0.0).sum()

    @staticmethod
    def backward(ctx, grad):
        local, log_sum_exp, index, target_here, valid = ctx.saved_tensors
        grad_local = local.sub(log_sum_exp[:, None]).exp_()  # this shard's softmax (one buffer)
        grad_local.scatter_add_(-1, index, -target_here[:, None].to(grad_local.dtype))  # - onehot, no host sync
        grad_local.mul_((valid.to(grad_local.dtype) * grad)[:, None])
        return grad_local, None, None, None, None
