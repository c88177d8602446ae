"""Count the bytes every collective of a step moves, at the process-group level.

`CommCounter` is a TorchDispatchMode: it sees both the c10d ops that FSDP2 issues and the
functional collectives that DTensor issues (also those it issues inside an op's dispatch, such as
the vocabulary-parallel loss's), with their tensors and process groups. For each
collective kind it records the payload (the full tensor a collective is about: the gathered
output of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce) and the
"bus bytes" one rank sends with a ring algorithm over a group of d ranks:

    all-gather, reduce-scatter:  payload * (d - 1) / d
    all-reduce:                  payload * 2 * (d - 1) / d
    broadcast:                   payload
    all-to-all:                  the bytes of the input sent to other ranks (exact from the split
                                 sizes: expert-parallel dispatches are uneven)

Counts are exact on any machine: they depend on shapes and the layout, not on timing.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

c10d = torch.ops.c10d
funcol = torch.ops._c10d_functional


def _bytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_bytes(t) for t in tensors)


def _process_group(group) -> torch.distributed.ProcessGroup:
    """The group an op carries: a name (functional collectives) or a ScriptObject (c10d ops)."""
    if isinstance(group, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group)
    if not isinstance(group, torch.distributed.ProcessGroup):
        group = torch.distributed.ProcessGroup.unbox(group)
    return group


def _group_size(group) -> int:
    return _process_group(group).size()


# op -> (kind, payload bytes from the op's args, group size from the op's args)
_OPS = {
    c10d._allgather_base_.default: ("all_gather", lambda a: _bytes(a[0]), lambda a: _group_size(a[2])),
    c10d.allgather_into_tensor_coalesced_.default: ("all_gather", lambda a: _bytes(a[0]), lambda a: _group_size(a[2])),
    c10d._reduce_scatter_base_.default: ("reduce_scatter", lambda a: _bytes(a[1]), lambda a: _group_size(a[2])),
    c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", lambda a: _bytes(a[1]), lambda a: _group_size(a[2])),
    c10d.allreduce_.default: ("all_reduce", lambda a: _bytes(a[0]), lambda a: _group_size(a[1])),
    c10d.alltoall_base_.default: ("all_to_all", lambda a: _bytes(a[1]), lambda a: _group_size(a[2])),
    c10d.broadcast_.default: ("broadcast", lambda a: _bytes(a[0]), lambda a: _group_size(a[1])),
    funcol.all_gather_into_tensor.default: ("all_gather", lambda a: _bytes(a[0]) * a[1], lambda a: a[1]),
    funcol.reduce_scatter_tensor.default: ("reduce_scatter", lambda a: _bytes(a[0]), lambda a: a[2]),
    funcol.all_reduce.default: ("all_reduce", lambda a: _bytes(a[0]), lambda a: _group_size(a[2])),
    funcol.all_to_all_single.default: ("all_to_all", lambda a: _bytes(a[0]), lambda a: _group_size(a[3])),
    funcol.broadcast.default: ("broadcast", lambda a: _bytes(a[0]), lambda a: _group_size(a[2])),
}


def _sent_to_others(func, args, payload: int, size: int) -> float:
    """An all-to-all's bytes to other ranks: the input minus this rank's own split."""
    functional = func is funcol.all_to_all_single.default
    tensor, splits, group = (args[0], args[2], args[3]) if functional else (args[1], args[4], args[2])
    rank = torch.distributed.get_rank(_process_group(group))
    rows = tensor.shape[0] if tensor.dim() else 1
    own = splits[rank] if splits else rows // size
    return payload * (rows - own) / max(rows, 1)


def bus_bytes(kind: str, payload: int, group_size: int) -> float:
    if group_size <= 1:
        return 0.0
    share = (group_size - 1) / group_size
    return {"all_reduce": 2 * share * payload, "broadcast": float(payload)}.get(kind, share * payload)


class CommCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.payload: dict[str, int] = defaultdict(int)
        self.bus: dict[str, float] = defaultdict(float)
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(t is DTensor for t in types):
            # modes run before subclasses: let DTensor desugar the op into local ops and the
            # collectives its placements need, which then come back through this mode
            return NotImplemented
        entry = _OPS.get(func)
        if entry is not None:
            kind, payload_of, size_of = entry
            payload, size = payload_of(args), size_of(args)
            if size > 1:
                self.calls[kind] += 1
                self.payload[kind] += payload
                self.bus[kind] += _sent_to_others(func, args, payload, size) if kind == "all_to_all" else bus_bytes(kind, payload, size)
        elif func.namespace in ("c10d", "_c10d_functional") and "wait" not in func.name() and "wrap_tensor" not in func.name():
            self.unknown.add(str(func))
        return func(*args, **(kwargs or {}))
