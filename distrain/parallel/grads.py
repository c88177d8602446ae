"""Gradient norm and clipping over every mesh axis, in one place.

Each gradient contributes the squares of its local entries, summed over the mesh dimensions on
which it is sharded and not over those on which it is replicated: a parameter replicated over
the TP ranks (a norm under FSDP x TP) is counted once, a sharded one once per shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale gradients so that their global L2 norm is at most `max_norm`; return the norm
    before clipping (identical on every rank)."""
    squares: dict[tuple, torch.Tensor] = {}
    meshes: dict[tuple, object] = {}
    locals_ = []
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            assert not any(p.is_partial() for p in grad.placements), "gradients must be reduced before clipping"
            key = (id(grad.device_mesh), tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate()))
            meshes[key] = grad.device_mesh
            local = grad.to_local()
        else:
            key, local = (), grad
        locals_.append(local)
        square = local.float().pow(2).sum()
        squares[key] = squares[key] + square if key in squares else square
    total = torch.zeros((), device=locals_[0].device if locals_ else "cpu")
    for key, square in squares.items():
        for mesh_dim in key[1] if key else ():
            dist.all_reduce(square, group=meshes[key].get_group(mesh_dim))
        total += square
    norm = total.sqrt()
    if math.isfinite(max_norm):
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        if coef < 1.0:
            torch._foreach_mul_(locals_, coef)
    return norm
