"""Documents -> fixed-length packed samples, document boundaries respected.

The token stream (documents back to back, each ending in eos; memory-mapped from the token store)
is cut into samples of `seq_len` tokens: sample i holds tokens [i*L, (i+1)*L), read when asked for. Every token lands in exactly one sample; the last
sample is padded with eos tokens that are never targets.

Within a sample:
- `position_ids` restart at 0 where a document starts (and at the sample's start), and
  transformers turns restarting positions into a block-diagonal causal mask (with
  `attention_mask=None` and no cache), so no token attends across a document boundary;
- `labels[t]` is the next token when it belongs to the same document, else -100 (ignored):
  a document's first token is never predicted from the one before it, nor across samples.

Whether a model's forward isolates documents so is checked before spawn
(`distrain.models.document_leak`); `data.document_masking=false` gives positions 0..L-1 instead
(samples attend across documents, on any model).
"""

from __future__ import annotations

import torch

from distrain.data.corpus import TokenizedCorpus

IGNORE_INDEX = -100


class PackedDataset:
    def __init__(self, corpus: TokenizedCorpus, seq_len: int, document_masking: bool = True):
        self.corpus = corpus
        self.seq_len = seq_len
        self.document_masking = document_masking
        self.num_tokens = corpus.tokens.numel()
        self.num_samples = -(-self.num_tokens // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        L = self.seq_len
        begin, end = index * L, min((index + 1) * L, self.num_tokens)
        num_real = end - begin
        input_ids = torch.full((L,), self.corpus.eos_id, dtype=torch.int64)
        input_ids[:num_real] = self.corpus.tokens[begin:end].to(torch.int64)
        is_start = torch.ones(L, dtype=torch.bool)  # padding: every pad token its own segment
        is_start[:num_real] = False
        # the document starts inside [begin, end): a binary search in the (memory-mapped) offsets,
        # so memory stays flat whatever the corpus size
        bounds = torch.searchsorted(self.corpus.doc_starts, torch.tensor([begin, end], dtype=torch.int64))
        is_start[self.corpus.doc_starts[bounds[0] : bounds[1]] - begin] = True
        is_start[0] = True
        position_ids = _positions_from_starts(is_start) if self.document_masking else torch.arange(L)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.int64)
        same_doc = ~is_start[1:num_real]
        labels[: num_real - 1] = torch.where(same_doc, input_ids[1:num_real], IGNORE_INDEX)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


    def num_targets(self, indices: torch.Tensor) -> int:
        """How many labels of the samples `indices` are targets, from the document offsets alone
        (no token is read): every real token but the last, less the document starts after the
        first, per sample; two binary searches for all of them."""
        begin = indices.to(torch.int64) * self.seq_len
        end = torch.clamp(begin + self.seq_len, max=self.num_tokens)
        after_begin = torch.searchsorted(self.corpus.doc_starts, begin, right=True)
        before_end = torch.searchsorted(self.corpus.doc_starts, end, right=False)
        starts_inside = before_end - after_begin  # documents starting in (begin, end)
        return int(torch.clamp(end - begin - 1 - starts_inside, min=0).sum())


def _positions_from_starts(is_start: torch.Tensor) -> torch.Tensor:
    index = torch.arange(is_start.numel())
    last_start = torch.cummax(torch.where(is_start, index, 0), dim=0).values
    return index - last_start


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
