"""Shard a meta-device model over the mesh, then materialize and load its weights.

The order is fixed: TP/SP -> EP -> activation checkpointing -> compile -> FSDP (per block, then
the root). This module is the only place that calls `fully_shard`.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.models import ModelSpec, to_empty
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, spec: ModelSpec, dims: ParallelDims, mesh, bf16: bool) -> list[str]:
    """Apply every parallelism in order; return the FQNs of parameters whose gradients are
    partial over the TP ranks (summed by `sync_tp_grads` after backward)."""
    partial_grads = []
    if dims.tp > 1:
        partial_grads = apply_tensor_parallel(model, spec, mesh["tp"], dims.sp)  # TP + SP
    # EP lands here with the MoE issue
    if dims.activation_checkpointing != "none":
        apply_activation_checkpointing(spec, selective=dims.activation_checkpointing == "selective")
    if dims.compile:
        for block in spec.blocks:
            block.compile()
    if dims.fsdp:
        apply_fsdp(model, spec, mesh, bf16, dims.reshard_after_forward, dims.cpu_offload)
    return partial_grads


# Ops whose outputs selective checkpointing keeps: the matmuls and attention; everything else
# (norms, activations, rotary, residual adds) is recomputed in backward.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def apply_activation_checkpointing(spec: ModelSpec, selective: bool) -> None:
    """Checkpoint each block's forward. The block's `forward` is wrapped rather than the block
    replaced, so parameter names (and checkpoints) are unchanged and FSDP's hooks, which run in
    `__call__`, stay outside the recomputed region."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    def context():
        return create_selective_checkpoint_contexts(policy)

    for block in spec.blocks:
        forward = block.forward
        extra = {"context_fn": context} if selective else {}

        def checkpointed(*args, _forward=forward, _extra=extra, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **_extra, **kwargs)

        block.forward = checkpointed


def apply_fsdp(model: nn.Module, spec: ModelSpec, mesh, bf16: bool, reshard_after_forward: bool, cpu_offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in spec.blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
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

    to_empty(model, device)
    _init_non_persistent_buffers(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state or {}, options=options)


@torch.no_grad()
def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers outside every state dict (rotary inv_freq, Gemma's embed_scale) are computed by the
    model's own init. It also re-inits the module's parameters, so it runs before they are
    loaded, and on their local shards: HF's init functions expect plain tensors."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if not any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            continue
        sharded = {name: p for name, p in module._parameters.items() if isinstance(p, DTensor)}
        for name, param in sharded.items():
            module._parameters[name] = nn.Parameter(param.to_local(), requires_grad=False)
        try:
            model._init_weights(module)
        finally:
            module._parameters.update(sharded)


def full_random_state(model_config, seed: int) -> dict[str, torch.Tensor]:
    """The model's seeded random init, built whole on the CPU (identical for every layout)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    to_empty(model, torch.device("cpu"))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model.state_dict()
