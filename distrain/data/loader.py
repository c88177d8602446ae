"""Per-rank batches whose state is a global position, independent of the data-parallel size.

Global step s consumes samples [p, p + G) of an endless, deterministic stream (G =
`train.global_batch_size`, p = samples consumed by the whole run). The stream visits every sample
once per epoch in an order drawn from (seed, epoch). Data-parallel rank r of D takes the
contiguous slice [r * G / D, (r + 1) * G / D) of each global batch and splits it into
micro-batches. The saved state is just p (plus a fingerprint of the data), so a run resumed with
another D continues with exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import torch

from distrain.data.packing import IGNORE_INDEX, PackedDataset, collate


class GlobalBatchLoader:
    def __init__(
        self,
        dataset: PackedDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ):
        assert global_batch_size % (micro_batch_size * dp_size) == 0
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.position = 0
        self._epoch, self._order = -1, None

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The order in which epoch `epoch` visits the samples (drawn once per epoch)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=generator)
        return self._order

    def _sample_indices(self, position: int, count: int) -> torch.Tensor:
        """The sample indices at stream positions [position, position + count)."""
        parts = []
        while count > 0:
            epoch, offset = divmod(position, len(self.dataset))
            take = min(count, len(self.dataset) - offset)
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            position, count = position + take, count - take
        return torch.cat(parts)

    def next_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch; advances the global position.
        Each carries `global_targets`, the number of targets in the whole global batch (every
        rank counts it from the document offsets: the loss is normalized by it without a
        collective)."""
        per_rank = self.global_batch_size // self.dp_size
        indices = self._sample_indices(self.position, self.global_batch_size)
        samples = [self.dataset[int(i)] for i in indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]]
        global_targets = torch.tensor(self.dataset.num_targets(indices))
        self.position += self.global_batch_size
        mb = self.micro_batch_size
        return [dict(collate(samples[i : i + mb]), global_targets=global_targets) for i in range(0, per_rank, mb)]

    def state_dict(self) -> dict[str, Any]:
        # NOTE: seed, seq_len and fingerprint define the stream that `position` indexes; a resume
        #       that changes them is refused before spawn (distrain.checkpoint.resume)
        return {"position": self.position, "seed": self.seed, "seq_len": self.dataset.seq_len, "fingerprint": self.dataset.corpus.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.dataset.corpus.fingerprint:
            raise ValueError(
                f"checkpoint data fingerprint {state['fingerprint']} differs from this run's "
                f"{self.dataset.corpus.fingerprint}: the data or tokenizer changed; resume with the "
                "same data.* settings or start a new run.dir"
            )
        self.position = int(state["position"])


def eval_batches(dataset: PackedDataset, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """This rank's share of the first `num_samples` held-out samples: the same set at every eval
    and for every data-parallel size. Ranks take contiguous, possibly uneven, slices, topped up
    with fully masked samples so that every rank runs the same number of forward passes."""
    begin, end = (num_samples * dp_rank) // dp_size, (num_samples * (dp_rank + 1)) // dp_size
    samples = [dataset[i % len(dataset)] for i in range(begin, end)]
    largest_share = -(-num_samples // dp_size)  # ceil division
    num_micro = -(-largest_share // micro_batch_size)
    filler = dict(dataset[0], labels=torch.full((dataset.seq_len,), IGNORE_INDEX))
    samples += [filler] * (num_micro * micro_batch_size - len(samples))
    return [collate(samples[j : j + micro_batch_size]) for j in range(0, len(samples), micro_batch_size)]
