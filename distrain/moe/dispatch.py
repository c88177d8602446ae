"""Expert parallelism: each rank of the `ep` mesh holds num_experts / ep consecutive experts, and
the token rows routed to an expert travel to the rank that holds it and back by all-to-all.

Per MoE layer and micro-batch, on every EP rank (rows already sorted by global expert):
1. exchange per-expert counts (one all-to-all of num_experts integers): each rank learns how many
   rows every other rank sends to each of its local experts (and, in pieces, how many in each);
2. all-to-all of the rows (exactly the routed rows, no padding, no token dropped); the received
   rows come in (source rank, local expert) blocks and are regrouped by local expert;
3. the local experts' grouped GEMMs (`local_experts`);
4. the reverse regrouping and all-to-all bring every output row back to the rank it came from.
Backward runs the same exchanges in reverse, so each expert's gradient sums the rows of every rank
that routed to it.

Overlap: each all-to-all is started (`_Start`) and waited on (`_Finish`) by two autograd functions,
and what runs between them runs while the rows travel, in forward and in backward: backward starts
the reverse all-to-all in `_Finish`'s backward and waits in `_Start`'s, and autograd runs the
work that forward did between them (created in that order, ready early) in that window too. Two
kinds of work go there:
- with `moe.dispatch_chunks=C` > 1, steps 2-4 run on C pieces of the rows, each a share of every
  expert's rows: all pieces are sent at once, and piece c's GEMMs run while piece c+1 is still
  arriving and piece c-1 is on its way back (C times the collectives, each 1/C of the bytes);
- the MoE block's shared expert, where the model calls it after its experts (DeepSeek-V2/V3,
  GLM-4-MoE, Llama 4 ...): it runs in step 2's window on the block's tokens, and the model's own
  call then returns that output (`SharedExpertAhead`). Models that call the shared expert first
  (the Qwen MoE family) have already computed it.
"""

from __future__ import annotations

import weakref

import torch
from torch.distributed._functional_collectives import all_to_all_single

from distrain.moe.experts import local_experts

_ops = torch.ops._c10d_functional


class _Exchange:
    """One all-to-all of rows, started by `_Start` and waited on by `_Finish`; in backward the
    reverse all-to-all, started by `_Finish`'s backward and waited on by `_Start`'s."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group_name: str):
        self.out_splits, self.in_splits, self.group_name = out_splits, in_splits, group_name
        self.reverse = None  # the gradient rows on their way back (backward)


class _Start(torch.autograd.Function):
    """Start the all-to-all of `x`; its output is read only after `_Finish`. Backward: wait for
    the reverse all-to-all that `_Finish`'s backward started."""

    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        return _ops.all_to_all_single(x.contiguous(), exchange.out_splits, exchange.in_splits, exchange.group_name)

    @staticmethod
    def backward(ctx, _):
        grad, ctx.exchange.reverse = _ops.wait_tensor(ctx.exchange.reverse), None
        return grad, None


class _Finish(torch.autograd.Function):
    """Wait for the all-to-all `_Start` began. Backward: start the reverse all-to-all (the
    gradient rows back to where they came from) without waiting for it."""

    @staticmethod
    def forward(ctx, pending, exchange):
        ctx.exchange = exchange
        return _ops.wait_tensor(pending)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.exchange
        ex.reverse = _ops.all_to_all_single(grad.contiguous(), ex.in_splits, ex.out_splits, ex.group_name)
        return grad, None  # (a placeholder of the pending rows' shape: `_Start` reads `reverse`)


class _Tokens:
    """Which values a tensor holds: its storage, offset, size and version, with a weak reference
    to the tensor that owns the storage (so the address cannot be reused while it is compared).
    The model reshapes the block's input for its experts (a view that dies after the call) and
    passes the original to the shared expert: both are the same tokens."""

    def __init__(self, x: torch.Tensor):
        self.key = _key(x)
        self.owner = weakref.ref(x if x._base is None else x._base) if self.key is not None else None

    def held_by(self, x: torch.Tensor) -> bool:
        return self.key is not None and self.owner() is not None and _key(x) == self.key


def _key(x: torch.Tensor):
    if type(x) is not torch.Tensor or not x.is_contiguous():
        return None
    return x.untyped_storage().data_ptr(), x.storage_offset(), x.numel(), x._version


class SharedExpertAhead:
    """Runs a MoE block's shared expert inside the dispatch all-to-all's window when the model
    calls it after the experts on the same tokens, and hands that output to the model's own call.

    The order is learned, not assumed: a forward that runs the model as written notes whether the
    shared expert was called on the tokens the experts had just dispatched (`_Tokens`);
    forwards that begin after that run it ahead. The switch happens only outside backward, so an
    activation-checkpointing recompute runs in the order of the forward it repeats. A model that
    calls the shared expert first is never run ahead; one whose call does not take the output run
    ahead (other tokens) stops being run ahead. A shared expert with hooks of its own is always
    left to the model."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.forward = module, module.forward
        self.learned = self.ahead = False
        self.dispatched = None  # the tokens the experts dispatched (while learning)
        self.early = None  # (tokens, output) run in the window, for the model's call
        module.forward = self._model_call

    def run_in_window(self, tokens: torch.Tensor) -> None:
        if self.early is not None:  # run ahead, and the model did not take it
            self.learned, self.early = False, None
        if torch._C._current_graph_task_id() == -1:  # not a recompute inside backward
            self.ahead = self.learned and not (self.module._forward_pre_hooks or self.module._forward_hooks)
        if self.ahead:
            self.early = (_Tokens(tokens), self.forward(tokens))
        else:
            self.dispatched = _Tokens(tokens)

    def _model_call(self, x, *args, **kwargs):
        early = self._early_output(x, args, kwargs)
        return early if early is not None else self.forward(x, *args, **kwargs)

    @torch.compiler.disable  # bookkeeping on storage addresses, outside compiled blocks' graphs
    def _early_output(self, x, args, kwargs) -> torch.Tensor | None:
        early, self.early = self.early, None
        if early is not None and not args and not kwargs and early[0].held_by(x):
            return early[1].view(*x.shape[:-1], early[1].shape[-1])
        dispatched, self.dispatched = self.dispatched, None
        self.learned = dispatched is not None and dispatched.held_by(x)
        return None


class ExpertParallel:
    """The dispatcher of one experts module whose weights hold this rank's share of experts."""

    def __init__(self, ep_mesh, num_experts: int, shared: SharedExpertAhead | None = None):
        self.group = ep_mesh.get_group()
        self.size, self.rank = ep_mesh.size(), ep_mesh.get_local_rank()
        self.local = num_experts // self.size
        self.shared = shared
        self.remote_rows = 0  # rows sent to and received from other ranks by forward dispatches (the benchmark's count)

    # NOTE: eager inside compiled blocks: the row counts become Python split sizes (a graph break
    #       anyway), and the exchanges hand their backward's all-to-all from one autograd function
    #       to the other, which tracing cannot follow
    @torch.compiler.disable
    def __call__(self, experts, tokens: torch.Tensor, order: torch.Tensor, top_k: int, counts: torch.Tensor):
        """`order`: the (token, k) pairs sorted by expert, `counts[e]` of them for expert e. Returns
        the experts' output rows and the pairs they belong to, in the order they came back."""
        chunks = getattr(experts, "_distrain_dispatch_chunks", 1)
        order = _in_pieces(order, counts, chunks)
        # NOTE: functional collectives: selective activation checkpointing keeps their outputs
        #       (distrain.parallel.parallelize), so a recompute exchanges nothing again
        received = all_to_all_single(counts, None, None, self.group).view(self.size, self.local)
        # NOTE: a piece's counts follow from the totals on both sides: the totals are all that travels
        sent, received = _piece_counts(counts.view(self.size, self.local), chunks), _piece_counts(received, chunks)
        splits = torch.stack([sent.sum(2), received.sum(2)]).tolist()  # [send / receive][piece][rank]: one sync
        pieces = order.split([sum(send) for send in splits[0]])
        name, starts = self.group.group_name, []
        for piece, send, recv in zip(pieces, *splits):
            if torch.is_grad_enabled():
                self.remote_rows += sum(send) - send[self.rank] + sum(recv) - recv[self.rank]
            there = _Exchange(recv, send, name)
            starts.append((there, _Start.apply(tokens[piece // top_k], there)))
        if self.shared is not None:
            self.shared.run_in_window(tokens)
        backs = []
        for c, (there, pending) in enumerate(starts):
            arrived = _Finish.apply(pending, there)  # piece c arrives while later pieces travel
            local = received[c]  # [source rank, local expert]
            by_expert = _by_local_expert(local, sum(there.out_splits))
            out = local_experts(experts, arrived[by_expert], local.sum(0))
            out = torch.empty_like(out).index_copy_(0, by_expert, out)  # back to (source, local expert) blocks
            back = _Exchange(there.in_splits, there.out_splits, name)
            backs.append((back, _Start.apply(out, back)))
        outs = [_Finish.apply(pending, back) for back, pending in backs]
        return outs[0] if chunks == 1 else torch.cat(outs), order


def _in_pieces(order: torch.Tensor, counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """`order` (pairs sorted by expert) rearranged into `chunks` consecutive pieces, each holding a
    share of every expert's pairs (the i-th of an expert's n pairs goes to piece i * chunks // n)
    sorted by expert."""
    if chunks == 1:
        return order
    experts = counts.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=order.device), counts, output_size=order.numel())
    in_expert = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[expert_of_row]
    piece = in_expert * chunks // counts[expert_of_row]
    return order[torch.argsort(piece, stable=True)]


def _piece_counts(counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """[chunks, *counts.shape]: how many of each count's n pairs `_in_pieces` puts in each piece
    (the i with i * chunks // n == c: ceil((c+1) n / chunks) - ceil(c n / chunks))."""
    c = torch.arange(chunks + 1, device=counts.device).view(-1, *[1] * counts.dim())
    bounds = (c * counts + chunks - 1) // chunks
    return bounds[1:] - bounds[:-1]


def _by_local_expert(received: torch.Tensor, rows: int) -> torch.Tensor:
    """Indices putting the `rows` rows that arrived in (source, local expert) blocks in (local
    expert, source) order."""
    sources, local = received.shape
    block = torch.repeat_interleave(torch.arange(sources * local, device=received.device), received.reshape(-1), output_size=rows)
    key = (block % local) * sources + block // local
    return torch.argsort(key, stable=True)


def apply_expert_parallel(moe_blocks, ep_mesh) -> None:
    """Shard every experts module's weights over `ep_mesh` on the experts dimension (DTensor
    `Shard(0)`, so DCP reshards them) and route its tokens through `ExpertParallel`, with the
    block's shared expert in the dispatch's window where the model allows it."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    for block in moe_blocks:
        experts = block.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, ep_mesh, [Shard(0)], src_data_rank=None)
            experts._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)
        shared = SharedExpertAhead(block.shared_expert) if block.shared_expert is not None else None
        experts._distrain_dispatcher = ExpertParallel(ep_mesh, experts.num_experts, shared)
