"""Router load: per-layer token counts per expert, the auxiliary load-balancing loss, statistics
(with the pairs dropped over capacity, `moe.capacity_factor`).

Hooks on each MoE layer's router (its logits, [tokens, experts]) and experts (the routed expert
ids) record one entry per layer while the trainer runs a micro-batch's forward (`recording`);
recomputation under activation checkpointing and evaluation record nothing. After the forward,
`aux_loss` all-reduces the counts of every layer over the data-parallel ranks at once (one
collective of layers x experts integers; with the loss off they are only statistics, and ride on
the trainer's one all-reduce of the step instead) and returns this rank's share of the loss

    coef x mean over layers of  E x sum_e f_e x P_e,

f_e the fraction of the micro-batch's routed (token, expert) pairs of all data-parallel ranks
that went to expert e, P_e the mean router probability of e over those tokens: each rank adds the
probabilities of its own tokens divided by the global token count, so the gradients, summed over
the data-parallel ranks as every gradient is, are those of the global formula. Under TP the router
sees the same tokens on every TP rank and its gradient is summed over TP: the share is divided by
the TP size so the sum is right. The counts are kept for the logged statistics, and for the
auxiliary-loss-free balancing of routers that carry an `e_score_correction_bias` (DeepSeek-V3):
after each applied step `update_biases` moves each expert's bias by `rate` toward balance, up if
the step's global load of the expert is below the mean, down if above (the same on every rank).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distrain.moe.experts import count_per_expert


class RouterStats:
    def __init__(self, moe_blocks, dp_group, dp_size: int, tp_size: int, coef: float, device: torch.device):
        self.blocks, self.dp_group, self.dp_size = moe_blocks, dp_group, dp_size
        self.coef, self.share = coef, 1.0 / tp_size
        self.num_experts = moe_blocks[0].experts.num_experts
        self.on = False
        self.logits: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, torch.Tensor] = {}  # (token, expert) pairs over capacity (moe.capacity_factor)
        # per layer: routed pairs per expert, then the pairs dropped, since the last summary
        self.load = torch.zeros(len(moe_blocks), self.num_experts + 1, dtype=torch.float64, device=device)
        self.step_load = torch.zeros(len(moe_blocks), self.num_experts, dtype=torch.float64, device=device)  # this step's
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=device)  # this rank's shares, since the last summary
        self.micro_batches = 0
        self.pending: torch.Tensor | None = None  # counts awaiting the step's all-reduce (aux loss off)
        for layer, block in enumerate(moe_blocks):
            block.router.register_forward_hook(self._keep_logits(layer))
            block.experts.register_forward_pre_hook(self._keep_indices(layer), with_kwargs=True)
            block.experts.register_forward_hook(self._keep_dropped(layer))

    def _keep_logits(self, layer: int):
        def hook(module, args, output):
            if self.on and torch.is_grad_enabled():
                logits = output[0] if isinstance(output, tuple) else output
                self.logits[layer] = logits.reshape(-1, logits.shape[-1])

        return hook

    def _keep_indices(self, layer: int):
        def hook(module, args, kwargs):
            if self.on and torch.is_grad_enabled():
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                self.indices[layer] = index.detach()

        return hook

    def _keep_dropped(self, layer: int):
        def hook(module, args, output):
            dropped = module.__dict__.pop("_distrain_dropped", None)
            if self.on and torch.is_grad_enabled() and dropped is not None:
                self.dropped[layer] = dropped

        return hook

    @contextlib.contextmanager
    def recording(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def aux_loss(self) -> torch.Tensor | None:
        """This rank's share of the micro-batch's load-balancing loss (None with coef 0); takes
        the recorded entries and adds the micro-batch's global counts to the statistics."""
        layers = sorted(self.indices)
        assert layers == list(range(len(self.blocks))), f"router statistics recorded layers {layers}"
        counts = torch.stack([
            torch.cat([count_per_expert(self.indices[i], self.num_experts), self.dropped.get(i, self.indices[i].new_zeros(())).reshape(1)])
            for i in layers
        ]).to(torch.float64)
        self.micro_batches += 1
        aux = None
        if self.coef == 0:  # the counts are only statistics: summed over the ranks once per step
            self.pending = counts if self.pending is None else self.pending + counts
        else:
            if self.dp_size > 1:
                dist.all_reduce(counts, group=self.dp_group)
            self.add_global(counts)
            counts = counts[:, :-1]
            routed = counts.sum(dim=1, keepdim=True)  # (token, expert) pairs of the global micro-batch
            tokens = routed / self.indices[0].shape[-1]
            terms = []
            for i in layers:
                probs = F.softmax(self.logits[i].float(), dim=-1)
                fraction = (counts[i] / routed[i]).to(probs.dtype)
                terms.append(self.num_experts * (fraction * probs.sum(dim=0)).sum() / tokens[i].to(probs.dtype))
            aux = self.coef * self.share * torch.stack(terms).mean()
            self.aux_sum += aux.detach().to(torch.float64)
        self.logits.clear()
        self.indices.clear()
        self.dropped.clear()
        return aux

    def take_pending(self) -> torch.Tensor | None:
        """This rank's counts of the step not yet summed over the ranks (with the aux loss off),
        for the trainer's one all-reduce of the step; `add_global` takes the sum back."""
        pending, self.pending = self.pending, None
        return pending

    def add_global(self, counts: torch.Tensor) -> None:
        """Global counts, [layers, experts + dropped], into the statistics and the step's load."""
        self.load += counts
        self.step_load += counts[:, :-1]

    @torch.no_grad()
    def update_biases(self, rate: float, applied: bool) -> None:
        """After a step: move the correction biases toward balance (`applied`: the step's update
        was applied; a skipped step changes no state)."""
        if applied and rate > 0:
            for layer, block in enumerate(self.blocks):
                bias = getattr(block.router, "e_score_correction_bias", None)
                if bias is not None:
                    load = self.step_load[layer]
                    bias += rate * torch.sign(load.mean() - load).to(bias.dtype)
        self.step_load.zero_()

    def summary(self) -> dict:
        """Statistics since the last summary (collective: every rank calls it): per layer the
        global tokens per expert and max / mean load, and the mean aux loss per micro-batch."""
        aux = self.aux_sum.clone()
        if self.coef > 0 and self.dp_size > 1:
            dist.all_reduce(aux, group=self.dp_group)
        load, dropped = self.load[:, :-1], self.load[:, -1]
        max_mean = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
        out = {
            "moe_aux_loss": aux.item() / max(self.micro_batches, 1) / self.share if self.coef > 0 else None,
            "moe_max_mean_load": max_mean,
            "moe_tokens_per_expert": load.long().tolist(),
            "moe_dropped_fraction": (dropped / load.sum(dim=1).clamp(min=1)).tolist(),
        }
        self.load.zero_()
        self.aux_sum.zero_()
        self.micro_batches = 0
        return out
