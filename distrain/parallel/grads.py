"""Gradient norm and clipping over every mesh axis, in one place.

Each rank adds the squares of the gradient entries it owns: a gradient sharded on a mesh axis is
owned by every rank of that axis (each its own shard), one replicated on an axis only by the rank
at coordinate 0 there (HSDP replicas, the TP ranks of a parameter TP leaves whole), and a plain
tensor on a multi-rank job (replicated everywhere) only by rank 0. Summed over the whole world,
these count every entry exactly once: the trainer adds this sum to the one all-reduce of its step
(`Trainer.train_step`) rather than spending a collective on it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def owned_square_sum(parameters) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (fp64; see the module docstring)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    owned = []
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            assert not any(p.is_partial() for p in grad.placements), "gradients must be reduced before the norm"
            mesh = grad.device_mesh
            if mesh.size() != world:  # refused when the model is sharded (parallelize._check_spans_world)
                raise RuntimeError(f"a gradient on a mesh of {mesh.size()} of {world} ranks: its owners are ambiguous")
            if all(mesh.get_local_rank(i) == 0 for i, p in enumerate(grad.placements) if p.is_replicate()):
                owned.append(grad.to_local())
        elif not dist.is_initialized() or dist.get_rank() == 0:
            owned.append(grad)
    if not owned:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(owned, 2.0)  # one pass per tensor, no squared copies
    return torch.stack([n.double() for n in norms]).pow(2).sum()


@torch.no_grad()
def clip_(parameters, norm: float, max_norm: float) -> None:
    """Scale the gradients so that their global norm `norm` becomes at most `max_norm`."""
    if math.isfinite(max_norm) and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([_local(p.grad) for p in parameters if p.grad is not None], coef)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
