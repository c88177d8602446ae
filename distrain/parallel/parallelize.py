"""Shard a meta-device model over the mesh, then materialize and load its weights.

The order is fixed: TP/SP -> EP -> activation checkpointing -> compile -> FSDP (per block, then
the root). This module is the only place that calls `fully_shard`.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.models import ModelSpec
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, spec: ModelSpec, dims: ParallelDims, mesh, bf16: bool) -> list[str]:
    """Apply every parallelism in order; return the FQNs of parameters whose gradients are
    partial over the TP ranks (summed by `sum_partial_grads` after backward)."""
    partial_grads = []
    if dims.tp > 1:
        partial_grads = apply_tensor_parallel(model, spec, mesh["tp"], dims.sp)  # TP + SP
    # EP, activation checkpointing and compile come here, in this order
    if dims.dp > 1:
        apply_fsdp(model, spec, mesh, bf16)
    return partial_grads


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
        module.set_force_sum_reduction_for_comms(True)


def materialize(model: nn.Module, device: torch.device, full_state: dict[str, torch.Tensor] | None) -> None:
    """Allocate the (possibly sharded) parameters on `device` and fill them from rank 0.

    `full_state` is the full model's state on rank 0 (None elsewhere): pretrained weights, or a
    seeded random init built on the CPU, so that every layout starts from the same numbers.
    Each rank keeps only its shards of the broadcast.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state or {}, options=options)
    # Non-persistent buffers (rotary inv_freq) are not in any state dict: let the model's own
    # init recompute them on modules that hold no parameters of their own.
    with torch.no_grad():
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is None and any(
                name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)
            ):
                model._init_weights(module)


def full_random_state(model_config, seed: int) -> dict[str, torch.Tensor]:
    """The model's seeded random init, built whole on the CPU (identical for every layout)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model.state_dict()
