"""Tensor and sequence parallelism from the model's own plan (`config.base_model_tp_plan`).

The plan's keys (module patterns relative to the base model) and styles are read as data and
mapped onto torch DTensor styles:

- "colwise": weight (and bias) sharded on the output features; input replicated.
- "rowwise": weight sharded on the input features; output all-reduced to replicated, or with SP
  reduce-scattered onto the sequence dimension.
- "replicated_with_grad_allreduce": a replicated parameter that only sees this rank's heads
  (Qwen3's q_norm/k_norm), so its gradient is partial and summed over the TP ranks.

The embedding is sharded on the vocabulary (rowwise); the lm_head on the vocabulary too
(colwise), and its logits stay sharded: cross-entropy runs under `loss_parallel` without ever
gathering the full vocabulary.

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

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from distrain.config.schema import ConfigError
from distrain.models import ModelSpec, keep_tied

SUPPORTED_STYLES = ("colwise", "rowwise", "replicated_with_grad_allreduce")


def resolved_plan(model: nn.Module) -> dict[str, str]:
    """Module FQN -> style, for every module the model's TP plan names."""
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    if not plan:
        raise ConfigError(
            f"{type(model).__name__} declares no tensor-parallel plan (config.base_model_tp_plan); "
            "use parallel.tp=1 (the structural fallback is not implemented yet)"
        )
    prefix = model.base_model_prefix
    patterns = [(re.compile("^" + re.escape(f"{prefix}.{key}").replace(r"\*", r"\d+") + "$"), style) for key, style in plan.items()]
    resolved = {}
    for name, _ in model.named_modules():
        for pattern, style in patterns:
            if pattern.match(name):
                resolved[name] = style
    unsupported = sorted({style for style in resolved.values() if style not in SUPPORTED_STYLES})
    if unsupported:
        raise ConfigError(
            f"parallel.tp>1: {type(model).__name__}'s TP plan uses styles distrain does not map yet: "
            f"{', '.join(unsupported)} (mapped: {', '.join(SUPPORTED_STYLES)}); use parallel.tp=1"
        )
    return resolved


def apply_tensor_parallel(model: nn.Module, spec: ModelSpec, tp_mesh, sp: bool) -> list[str]:
    """Shard the model over `tp_mesh`; return the FQNs of parameters whose gradients are partial
    over the TP ranks (to be summed after backward)."""
    plan = resolved_plan(model)
    sequence = Shard(1)
    styles: dict[str, object] = {}
    gather_points = set()
    for name, style in plan.items():
        if style == "colwise":
            styles[name] = ColwiseParallel()
            gather_points.add(name.rsplit(".", 1)[0])
        elif style == "rowwise":
            styles[name] = RowwiseParallel(output_layouts=sequence if sp else Replicate())
    names = {module: name for name, module in model.named_modules()}
    embed_name, head_name = names[spec.embeddings], names[spec.lm_head]
    styles[embed_name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    styles[head_name] = ColwiseParallel(
        input_layouts=sequence if sp else Replicate(), output_layouts=Shard(-1), use_local_output=False
    )
    # NOTE: a tied embedding / lm_head weight is sharded the same way by both styles (vocab on
    #       dim 0); the second distribute wraps it in a new Parameter, so the tie is restored.
    with keep_tied(model):
        parallelize_module(model, tp_mesh, styles)

    for name in gather_points:
        model.get_submodule(name).register_forward_pre_hook(_ReplicateInput(tp_mesh, sp), with_kwargs=True)
    if sp:
        spec.blocks[0].register_forward_pre_hook(_SplitSequence(tp_mesh), with_kwargs=True)
        return [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    partial_modules = [name for name, style in plan.items() if style == "replicated_with_grad_allreduce"]
    return [f"{m}.{p}" for m in partial_modules for p, _ in model.get_submodule(m).named_parameters()]


def _first_tensor(args, kwargs):
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})


class _SplitSequence:
    """Enter the SP region: keep this rank's slice of the sequence (gradient: all-gather)."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __call__(self, module, args, kwargs):
        x, rebuild = _first_tensor(args, kwargs)
        local = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False).redistribute(placements=[Shard(1)]).to_local()
        return rebuild(local)


class _ReplicateInput:
    """Hand a module whose colwise projections share one input (q/k/v, gate/up) that input as a
    replicated DTensor: with SP, all-gathered from the sequence slices. Its gradient comes back
    partial from every projection, is summed locally, and is reduced once: reduce-scattered onto
    the sequence with SP, all-reduced without."""

    def __init__(self, mesh, sp: bool):
        self.mesh, self.sp = mesh, sp

    def __call__(self, module, args, kwargs):
        x, rebuild = _first_tensor(args, kwargs)
        if self.sp:
            full = DTensor.from_local(x, self.mesh, [Shard(1)], run_check=False).redistribute(placements=[Replicate()])
        else:
            full = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False)
        return rebuild(full)


def sync_tp_grads(model: nn.Module, partial_names: list[str], tp_group) -> None:
    """After backward: sum over the TP ranks the gradients that each rank computed from only its
    heads or its slice of the sequence, and give every sharded gradient its parameter's placement
    (the vocab-sharded embedding's gradient comes back replicated: a local slice, no traffic)."""
    params = dict(model.named_parameters())
    for param in params.values():
        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
            param.grad = param.grad.redistribute(placements=param.placements)
    grads = [params[n].grad for n in partial_names if params[n].grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return
    flat = torch.cat([g.reshape(-1) for g in local])
    torch.distributed.all_reduce(flat, group=tp_group)
    offset = 0
    for g in local:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
