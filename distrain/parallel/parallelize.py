"""Shard a meta-device model over the mesh, then materialize and load its weights.

The order is fixed: TP/SP -> EP -> activation checkpointing -> compile -> FSDP (per block, then
the root). This module is the only place that calls `fully_shard`.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.config.schema import ConfigError
from distrain.models import ModelSpec, init_non_persistent_buffers, meta_model, to_empty
from distrain.parallel.mesh import MeshViews, ParallelDims
from distrain.moe.dispatch import apply_expert_parallel
from distrain.parallel.tensor_parallel import TPGrads, apply_tensor_parallel, is_packed


def parallelize(model: nn.Module, spec: ModelSpec, dims: ParallelDims, mesh: MeshViews, bf16: bool) -> TPGrads:
    """Apply every parallelism in order; return what TP leaves to do to the gradients after backward."""
    tp_grads = TPGrads([], [])
    if dims.tp > 1:
        tp_grads = TPGrads(apply_tensor_parallel(model, spec, mesh.tp, dims.sp, ep=dims.ep > 1), [])  # TP + SP
    if dims.ep > 1:
        apply_expert_parallel(spec.moe_blocks, mesh.ep)
    if dims.activation_checkpointing != "none":
        apply_activation_checkpointing(spec, selective=dims.activation_checkpointing == "selective")
    if dims.compile:
        for block in spec.blocks:
            block.compile()
    if dims.fsdp:
        tp_grads = apply_fsdp(model, spec, dims, mesh, bf16, tp_grads)
    _check_spans_world(model, dims.world_size)
    return tp_grads


def _check_spans_world(model: nn.Module, world_size: int) -> None:
    """Every sharded parameter is laid out over all ranks (sharded or replicated on each mesh
    axis): what the gradient norm's ownership (`distrain.parallel.grads`) and the state ratio rely on."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and param.device_mesh.size() != world_size:
            raise ConfigError(
                f"{name} is laid out over {param.device_mesh.size()} of {world_size} ranks: its module holds parameters TP "
                "leaves whole beside TP-sharded submodules, which distrain does not shard over the TP ranks yet; use parallel.tp=1"
            )


# Ops whose outputs selective checkpointing keeps: the matmuls, attention, the experts' grouped
# GEMMs and every collective in a block (the expert-parallel all-to-alls, TP's all-reduces, SP's
# all-gathers and reduce-scatters: recomputing them would move their bytes again); everything else
# (norms, activations, rotary, residual adds, routing) is recomputed in backward.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


# distrain's Triton grouped GEMMs (matmuls, as above); its elementwise ops (the fused SwiGLU) are
# recomputed from their saved inputs, as the eager ops they replace were
_SAVED_DISTRAIN_OPS = {"distrain::grouped_mm", "distrain::grouped_mm_dw"}


# Ops that FSDP's hooks of a nested unit (the experts under EP) dispatch a different number of times
# in a recompute than in the forward it repeats: its profiler annotations, and the views of the
# autograd function that registers its post-backward hook (a unit grouping several blocks' experts
# registers it once per forward, for the first block, but again in each block's recompute).
_FSDP_HOOK_OPS = {
    torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
    torch.ops.aten.view.default,
}


def selective_policy(ctx, op, *args, **kwargs):
    """Selective checkpointing's choice per op: keep the matmuls, attention and collectives' outputs
    (`_SAVED_OPS`, `_SAVED_DISTRAIN_OPS`), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    saved = op in _SAVED_OPS or (getattr(op, "namespace", None) == "distrain" and op.name() in _SAVED_DISTRAIN_OPS)
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(spec: ModelSpec, selective: bool) -> None:
    """Checkpoint each block's forward. The block's `forward` is wrapped rather than the block
    replaced, so parameter names (and checkpoints) are unchanged and FSDP's hooks, which run in
    `__call__`, stay outside the recomputed region."""
    from torch.utils.checkpoint import SAC_IGNORED_OPS, checkpoint, create_selective_checkpoint_contexts

    # NOTE: a nested FSDP unit (the experts under EP) recomputed before its pre-backward hook has
    #       run executes FSDP's forward hooks again, which dispatch some ops a different number of
    #       times than in the forward; selective checkpointing replays ops by call count, so those
    #       ops (annotations and views: no computation, nothing it saves) are left out of it
    SAC_IGNORED_OPS.update(_FSDP_HOOK_OPS)

    def context():
        return create_selective_checkpoint_contexts(selective_policy)

    for block in spec.blocks:
        forward = block.forward
        extra = {"context_fn": context} if selective else {}

        def checkpointed(*args, _forward=forward, _extra=extra, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **_extra, **kwargs)

        block.forward = checkpointed


def apply_fsdp(model: nn.Module, spec: ModelSpec, dims: ParallelDims, mesh: MeshViews, bf16: bool, tp_grads: TPGrads) -> TPGrads:
    """fully_shard each group of blocks (`block_groups`), then the root, over the data-parallel
    ranks; a model smaller than one unit is one unit, the root's. With TP, the parameters TP
    leaves whole are FSDP-sharded over the data-parallel and TP ranks together, so no rank holds
    more than its share of any parameter; the reduce-scatter then also sums their partial
    gradients over TP. The small ones (norms, routers) of the whole model are one unit; larger ones
    (an attention the plan leaves whole, a shared expert outside TP under EP) one unit per group
    of blocks. With EP, the experts of each group are a unit of their own over the expert-FSDP
    mesh (their gradients summed there; the all-to-all already summed them over the EP ranks).
    Returns what is left for `sync_tp_grads`."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dp_mesh = mesh.dp
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    common = dict(mp_policy=policy, offload_policy=CPUOffloadPolicy() if dims.cpu_offload else OffloadPolicy())
    groups = block_groups(spec, dims.fsdp_unit_mb)
    units, whole_of_group = [], [[] for _ in groups]
    left_partial, copies = list(tp_grads.partial), []
    if dims.tp > 1:
        partial = set(tp_grads.partial)
        names = {module: name for name, module in model.named_modules()}
        group_of = {id(block): i for i, group in enumerate(groups) for block in group}
        small = []
        for owner in (*spec.blocks, model):
            for module in _modules_with_only_whole_params(owner, stop_at=spec.blocks if owner is model else ()):
                own = [f"{names[module]}.{n}" if names[module] else n for n, _ in module.named_parameters()]
                copies += [n for n in own if n not in partial]
                left_partial = [n for n in left_partial if n not in own]
                if owner is model or stays_gathered(module, spec):
                    small.append(module)
                else:
                    whole_of_group[group_of[id(owner)]].append(module)
        # NOTE: one unit holding the small ones of every block: one all-gather when the first is
        #       used, one reduce-scatter when backward has passed them (not two tiny collectives of
        #       each kind per block). Its reduce-scatter sums over TP both the partial gradients
        #       (per-head norms; every norm under SP: what they need) and the copies of gradients TP
        #       already made whole (tp times what they need: `sync_tp_grads` divides those shards
        #       by tp after backward, a local op, instead of a second unit); the groups' units
        #       below do the same. Kept unsharded between forward and backward: they are tiny, and
        #       resharding them breaks selective checkpointing of MoE blocks (their all-gather
        #       replayed inside the recompute is missing from its cache).
        if small:
            fully_shard(small, mesh=mesh.dp_shard_tp, reshard_after_forward=False, **common)
            units.append(small[0])
    # a model smaller than one unit is one unit (the root's: never resharded after forward)
    one_unit = len(groups) == 1 and sum(p.numel() for p in model.parameters()) * 4 < dims.fsdp_unit_mb * 1e6
    experts_of = {id(moe.experts): moe.experts for moe in spec.moe_blocks} if dims.ep > 1 else {}
    for i, group in enumerate(groups):
        # NOTE: the last unit is never resharded after its forward: backward starts with it, right
        #       after the loss, so resharding it would only all-gather the same bytes again
        reshard = dims.reshard_after_forward and i + 1 < len(groups)
        # NOTE: large parameters TP leaves whole are resharded like the rest of their group: held
        #       whole from forward to backward, every layer's attention (DeepSeek-V3's MLA under
        #       TP: 11B parameters) would sit unsharded on every rank
        if whole_of_group[i]:
            fully_shard(whole_of_group[i], mesh=mesh.dp_shard_tp, reshard_after_forward=reshard, **common)
            units.append(whole_of_group[i][0])
        experts = [m for block in group for m in block.modules() if id(m) in experts_of]
        if experts:
            fully_shard(experts, mesh=mesh.efsdp, reshard_after_forward=reshard, **common)
            units.append(experts[0])
        if not one_unit:
            fully_shard(group, mesh=dp_mesh, reshard_after_forward=reshard, **common)
            units.append(group[0])
    fully_shard(model, mesh=dp_mesh, **common)
    units.append(model)
    # NOTE: the loss is already divided by the global number of target tokens, so gradients are
    #       summed over data-parallel ranks, not averaged (this also avoids AVG, which gloo lacks).
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return TPGrads(left_partial, copies)


def stays_gathered(module: nn.Module, spec: ModelSpec) -> bool:
    """Whether a block's module that TP leaves whole is small enough for the model-wide unit kept
    gathered from forward to backward: 1-D parameters only (norms), or a router or shared-expert
    gate; anything larger is sharded and resharded with its group of blocks (`apply_fsdp`)."""
    gates = (m for moe in spec.moe_blocks for m in (moe.router, moe.shared_gate))
    return all(p.ndim <= 1 for p in module.parameters(recurse=False)) or any(module is m for m in gates)


def block_groups(spec: ModelSpec, unit_mb: float) -> list[list[nn.Module]]:
    """Consecutive decoder blocks: a block joins the open group until that holds at least
    `unit_mb` MB of parameters (fp32, whole, experts included), then the next one opens a new
    group: the FSDP units (blocks of `unit_mb` or more each get their own unit, unless they follow
    smaller blocks still below it)."""
    groups, size = [], 0.0
    for block in spec.blocks:
        if not groups or size >= unit_mb * 1e6:
            groups.append([])
            size = 0.0
        groups[-1].append(block)
        size += sum(p.numel() for p in block.parameters()) * 4
    return groups


def reshard(model: nn.Module) -> None:
    """Free what FSDP gathered for a forward that no backward follows (evaluation): without this
    the root's gathered parameters (embedding, lm_head) would stay whole until the next step."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _modules_with_only_whole_params(root: nn.Module, stop_at) -> list[nn.Module]:
    """Modules under `root` (not inside `stop_at`) that own parameters, all of them plain
    tensors (not sharded by TP), in a subtree holding no DTensor parameter."""
    from torch.distributed.tensor import DTensor

    skip = {id(m) for block in stop_at for m in block.modules()}
    found = []
    for module in root.modules():
        if id(module) in skip:
            continue
        own = list(module.parameters(recurse=False))
        if own and not any(isinstance(p, DTensor) for p in module.parameters()):
            found.append(module)
    return found


def materialize(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> None:
    """Allocate the (possibly sharded) parameters on `device` (on the host with `cpu_offload`:
    FSDP moves them in for compute; buffers stay on `device`), uninitialized; the model's own
    init computes the buffers that are in no state dict. Then one of the fills below."""
    to_empty(model, torch.device("cpu") if cpu_offload else device)
    init_non_persistent_buffers(model)
    if cpu_offload:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)


def fill_from_rank0(model: nn.Module, device: torch.device, full_state: dict[str, torch.Tensor] | None) -> None:
    """Every rank's shards from the full state on rank 0 (None elsewhere), broadcast: for weights
    that only come whole (a `.bin` checkpoint loaded by `from_pretrained`)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    # NOTE: set_model_state_dict slices every shard as one box of the full tensor, which a packed
    #       TP shard (`_StridedShard`: a slice of the gate rows and one of the up rows) is not:
    #       those parameters are broadcast whole afterwards and sliced by DTensor itself.
    packed = {
        name: (full_state or {}).get(name) for name, param in model.named_parameters()
        if is_packed(param)
    }
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state or {}, options=options)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in packed.items():
            param = params[name]
            full = full.to(device) if full is not None else torch.empty(param.shape, dtype=param.dtype, device=device)
            dist.broadcast(full, src=0)
            param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())


@torch.no_grad()
def fill_seeded(model: nn.Module, model_config, seed: int) -> None:
    """The model's random init, the same numbers under every layout, never whole anywhere: module
    by module, an unsharded copy of the module's own tensors is initialized by the model's own
    init (`_init_weights`) from a seed of (run.seed, module name), and each rank keeps its part.
    Memory: one module's tensors (the largest: a layer's experts)."""
    import zlib

    from distrain.checkpoint.hf_import import fill_local

    twin = meta_model(model_config)
    params = dict(model.named_parameters())  # each tied group once
    buffers = dict(model.named_buffers())
    for module_name, module in twin.named_modules():
        full = lambda n: f"{module_name}.{n}" if module_name else n  # noqa: E731
        own = [n for n, _ in module.named_parameters(recurse=False)]
        persistent = [n for n, b in module.named_buffers(recurse=False) if b is not None and n not in module._non_persistent_buffers_set]
        if not any(full(n) in params for n in own) and not persistent:
            continue
        module.to_empty(device=torch.device("cpu"), recurse=False)
        torch.manual_seed(zlib.crc32(f"{seed}:{module_name}".encode()))
        twin._init_weights(module)
        for n, tensor in module.named_parameters(recurse=False):
            if full(n) in params:
                fill_local(params[full(n)], tensor.detach())
        for n in persistent:
            if full(n) in buffers:
                buffers[full(n)].copy_(getattr(module, n))
        module.to_empty(device=torch.device("meta"), recurse=False)  # freed before the next module


def full_random_state(model_config, seed: int) -> dict[str, torch.Tensor]:
    """`fill_seeded`'s numbers as one whole state dict (for a plain model beside distrain's: benchmarks)."""
    model = meta_model(model_config)
    to_empty(model, torch.device("cpu"))
    init_non_persistent_buffers(model)
    fill_seeded(model, model_config, seed)
    return model.state_dict()
