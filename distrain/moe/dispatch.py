"""Expert parallelism: each rank of the `ep` mesh holds num_experts / ep consecutive experts, and
the token rows routed to an expert travel to the rank that holds it and back by all-to-all.

Per MoE layer and micro-batch, on every EP rank (rows already sorted by global expert):
1. exchange per-expert counts (one all-to-all of num_experts integers): each rank learns how many
   rows every other rank sends to each of its local experts;
2. all-to-all of the rows (exactly the routed rows, no padding, no token dropped); the received
   rows come in (source rank, local expert) blocks and are regrouped by local expert;
3. the local experts' grouped GEMMs (`local_experts`);
4. the reverse regrouping and all-to-all bring every output row back to the rank it came from.
Backward runs the same exchanges in reverse (the all-to-alls are autograd functions), so each
expert's gradient sums the rows of every rank that routed to it.
"""

from __future__ import annotations

import torch
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from distrain.moe.experts import local_experts


class ExpertParallel:
    """The dispatcher of one experts module whose weights hold this rank's share of experts."""

    def __init__(self, ep_mesh, num_experts: int):
        self.group = ep_mesh.get_group()
        self.size, self.rank = ep_mesh.size(), ep_mesh.get_local_rank()
        self.local = num_experts // self.size
        self.remote_rows = 0  # rows sent to and received from other ranks by forward dispatches (the benchmark's count)

    def __call__(self, experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # NOTE: functional collectives: selective activation checkpointing keeps their outputs
        #       (distrain.parallel.parallelize), so a recompute exchanges nothing again
        received = all_to_all_single(counts, None, None, self.group).view(self.size, self.local)  # [source rank, local expert]
        send_splits = counts.view(self.size, self.local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        if torch.is_grad_enabled():
            self.remote_rows += sum(send_splits) - send_splits[self.rank] + sum(recv_splits) - recv_splits[self.rank]
        arrived = all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)
        order = _by_local_expert(received)
        out = local_experts(experts, arrived[order], received.sum(0))
        out = torch.empty_like(out).index_copy_(0, order, out)  # back to (source, local expert) blocks
        return all_to_all_single_autograd(out, send_splits, recv_splits, self.group)


def _by_local_expert(received: torch.Tensor) -> torch.Tensor:
    """Indices putting rows that arrived in (source, local expert) blocks in (local expert,
    source) order."""
    sources, local = received.shape
    block = torch.repeat_interleave(torch.arange(sources * local, device=received.device), received.reshape(-1))
    key = (block % local) * sources + block // local
    return torch.argsort(key, stable=True)


def apply_expert_parallel(moe_blocks, ep_mesh) -> None:
    """Shard every experts module's weights over `ep_mesh` on the experts dimension (DTensor
    `Shard(0)`, so DCP reshards them) and route its tokens through `ExpertParallel`."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    for block in moe_blocks:
        experts = block.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, ep_mesh, [Shard(0)], src_data_rank=None)
            experts._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)
        experts._distrain_dispatcher = ExpertParallel(ep_mesh, experts.num_experts)
