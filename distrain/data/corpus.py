"""Text sources -> tokenized documents (one int32 token stream plus document starts), cached.

Sources:
- "stdlib": the Python standard library's `.py` files, taken in sorted path order up to
  `data.max_bytes`; a byte-level BPE tokenizer of `data.vocab_size` is trained on them. Offline,
  and present on every machine that runs distrain. The cache key covers the file list and sizes.
- "hf": a `datasets` dataset (hub name, or "json"/"parquet"/"text" with local `data.files`),
  tokenized with an AutoTokenizer.

Every document gets the end-of-text token appended. Documents are split into train and eval by a
fixed permutation of their indices, so the held-out set does not depend on the run's seed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from distrain.config.schema import DataConfig

EOT = "<|endoftext|>"


@dataclass
class TokenizedCorpus:
    tokens: torch.Tensor  # int32 [num_tokens]: documents back to back, each ending in eos
    doc_starts: torch.Tensor  # int64 [num_docs]: index in `tokens` where each document starts
    eos_id: int
    vocab_size: int
    fingerprint: str  # identifies source + tokenizer; a resumed run must see the same


@dataclass
class Corpus:
    train: TokenizedCorpus
    eval: TokenizedCorpus
    tokenizer_dir: Path  # an AutoTokenizer-loadable folder, copied into exports


def prepare_corpus(cfg: DataConfig) -> tuple[Path, str, int]:
    """Build the tokenized cache unless it exists; return (folder, fingerprint, tokenizer
    vocabulary size), reading no tokens. Called before any worker starts, so no rank waits for
    the build inside a collective; ranks sharing a machine then find it built."""
    cache_root = Path(cfg.cache_dir).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    if cfg.source == "stdlib":
        files = _stdlib_files(cfg.max_bytes)
        key = _digest([cfg.vocab_size, cfg.eval_fraction, [(str(p), p.stat().st_size) for p in files]])
        folder = cache_root / f"stdlib-{key}"
        with _locked(cache_root / f"stdlib-{key}.lock"):
            if not (folder / "done").exists():
                _build_stdlib(files, cfg, folder)
    else:
        key = _digest([cfg.dataset, cfg.dataset_config, cfg.files, cfg.split, cfg.text_field, cfg.tokenizer, cfg.eval_fraction])
        folder = cache_root / f"hf-{key}"
        with _locked(cache_root / f"hf-{key}.lock"):
            if not (folder / "done").exists():
                _build_hf(cfg, folder)
    meta = json.loads((folder / "meta.json").read_text())
    return folder, f"{key}/train", meta["vocab_size"]


def load_corpus(cfg: DataConfig) -> Corpus:
    folder, fingerprint, _ = prepare_corpus(cfg)
    key = fingerprint.split("/")[0]
    meta = json.loads((folder / "meta.json").read_text())
    splits = {
        name: TokenizedCorpus(
            tokens=torch.load(folder / f"{name}_tokens.pt"),
            doc_starts=torch.load(folder / f"{name}_doc_starts.pt"),
            eos_id=meta["eos_id"],
            vocab_size=meta["vocab_size"],
            fingerprint=f"{key}/{name}",
        )
        for name in ("train", "eval")
    }
    return Corpus(train=splits["train"], eval=splits["eval"], tokenizer_dir=folder / "tokenizer")


@contextlib.contextmanager
def _locked(path: Path):
    # Ranks on one machine build the cache once: the first takes the lock, the rest then read.
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _stdlib_files(max_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    return files


def _build_stdlib(files: list[Path], cfg: DataConfig, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT, bos_token=EOT, pad_token=EOT)
    docs = [enc.ids for enc in tokenizer.encode_batch(texts)]
    _write(folder, docs, hf_tokenizer, cfg.eval_fraction)


def _build_hf(cfg: DataConfig, folder: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer={cfg.tokenizer}: the tokenizer has no eos token; pick one that does")
    dataset = datasets.load_dataset(cfg.dataset, name=cfg.dataset_config, data_files=cfg.files or None, split=cfg.split)
    if cfg.text_field not in dataset.column_names:
        raise ValueError(f"data.text_field={cfg.text_field}: not a column of {cfg.dataset}; columns: {dataset.column_names}")
    encoded = dataset.map(
        lambda batch: {"ids": tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=dataset.column_names,
    )
    _write(folder, list(encoded["ids"]), tokenizer, cfg.eval_fraction)


def _write(folder: Path, docs: list[list[int]], tokenizer, eval_fraction: float) -> None:
    eos_id = tokenizer.eos_token_id
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(1234)).tolist()
    num_eval = max(1, round(eval_fraction * len(docs)))
    if len(docs) - num_eval < 1:
        raise ValueError(f"data: only {len(docs)} documents; need at least 2 to hold some out for eval")
    held_out = set(order[:num_eval])
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train", lambda i: i not in held_out), ("eval", lambda i: i in held_out)):
        chosen = [docs[i] + [eos_id] for i in range(len(docs)) if keep(i)]
        lengths = torch.tensor([len(d) for d in chosen], dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        tokens = torch.tensor([t for d in chosen for t in d], dtype=torch.int32)
        torch.save(tokens, tmp / f"{name}_tokens.pt")
        torch.save(starts, tmp / f"{name}_doc_starts.pt")
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps({"eos_id": eos_id, "vocab_size": len(tokenizer)}))
    (tmp / "done").touch()
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
