"""Shard a meta-device model over the mesh, then materialize and load its weights.

The order is fixed: TP/SP -> EP -> activation checkpointing -> compile -> FSDP (per block, then
the root). This module is the only place that calls `fully_shard`.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.models import ModelSpec
from distrain.parallel.mesh import ParallelDims


def parallelize(model: nn.Module, spec: ModelSpec, dims: ParallelDims, mesh, device: torch.device, bf16: bool) -> nn.Module:
    if dims.dp > 1:
        apply_fsdp(model, spec, mesh, bf16)
    return model


def apply_fsdp(model: nn.Module, spec: ModelSpec, mesh, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in spec.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    # NOTE: the loss is already divided by the global number of target tokens, so gradients are
    #       summed over data-parallel ranks, not averaged (this also avoids AVG, which gloo lacks).
    for module in [*spec.blocks, model]:
        module.set_gradient_divide_factor(1.0)


def materialize(model: nn.Module, device: torch.device, seed: int, weights: dict | None, has_weights: bool) -> None:
    """Allocate the (possibly sharded) parameters on `device`, init them, then load weights.

    `has_weights` is the same on every rank; `weights` (full tensors) is read on rank 0 only and
    broadcast, each rank keeping its shards.
    """
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    if has_weights:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, weights or {}, options=options)
