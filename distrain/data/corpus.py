"""Text sources -> a token store on disk: tokenized once, memory-mapped by every rank.

A store is a folder under `data.cache_dir`, named by a fingerprint of what it was built from:
- `{train,eval}_tokens.bin`: int32 tokens, the split's documents back to back, each ending in eos;
- `{train,eval}_doc_starts.npy`: int64, where each document starts;
- `tokenizer/` (an AutoTokenizer folder, copied into exports) and `meta.json`.
Ranks map the files (`np.memmap`) and read only the samples they train on, so memory while training
does not grow with the corpus. The store is built before any worker starts (`prepare_corpus`, from
the CLI), one builder per store (a file lock; the others wait, then read), written to a temporary
folder of its own and renamed, so a store is complete or absent. Where the lock does not span
machines (node-local locks on a cluster filesystem) or the filesystem has none, several builders
may run: each writes its own folder, the first rename publishes, and the others discard theirs.

Sources:
- "stdlib": the Python standard library's `.py` files, taken in sorted path order up to
  `data.max_bytes`; a byte-level BPE tokenizer of `data.vocab_size` is trained on them. Offline,
  and present on every machine that runs distrain.
- "hf": a `datasets` dataset (hub name, or "json"/"parquet"/"text" with local `data.files`),
  tokenized with an AutoTokenizer by `datasets.map` in `data.num_proc` processes. The dataset
  stays in Arrow files on disk; tokens go to the store a batch at a time, never the whole corpus
  as Python objects.
The fingerprint covers the source (hub name and split, or each local file's path, size and
modification time: an edited file rebuilds), the tokenizer (hub id, or its files' sizes and
times), and the settings that change the tokens (text field, eval fraction).

Every document gets the end-of-text token appended. A fixed draw (seed 1234, independent of the
run's seed) holds out `data.eval_fraction` of the documents for eval.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import time
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from distrain.config.schema import ConfigError, DataConfig

EOT = "<|endoftext|>"
STORE_VERSION = 2  # bump when the files' layout changes: older stores are rebuilt, never misread
_EVAL_SEED = 1234


@dataclass
class TokenizedCorpus:
    tokens: torch.Tensor  # int32 [num_tokens], memory-mapped: documents back to back, each ending in eos
    doc_starts: torch.Tensor  # int64 [num_docs], memory-mapped: index in `tokens` where each document starts
    eos_id: int
    vocab_size: int
    fingerprint: str  # identifies source + tokenizer; a resumed run must see the same


@dataclass
class Corpus:
    train: TokenizedCorpus
    eval: TokenizedCorpus
    tokenizer_dir: Path  # an AutoTokenizer-loadable folder, copied into exports


def prepare_corpus(cfg: DataConfig) -> tuple[Path, str, int]:
    """Build the token store unless it exists; return (folder, fingerprint, tokenizer vocabulary
    size), reading no tokens. Called before any worker starts, so no rank waits for the build
    inside a collective; ranks sharing a machine or filesystem then find it built."""
    cache_root = Path(cfg.cache_dir).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    if cfg.source == "stdlib":
        files = _stdlib_files(cfg.max_bytes)
        key = _digest([STORE_VERSION, cfg.vocab_size, cfg.eval_fraction, [(str(p), p.stat().st_size) for p in files]])
        build = lambda folder: _build_stdlib(files, cfg, folder)  # noqa: E731
    else:
        _check_hf_source(cfg)
        key = _digest([STORE_VERSION, cfg.dataset, cfg.dataset_config, _files_fingerprint(cfg.files), cfg.split, cfg.text_field,
                       _tokenizer_fingerprint(cfg.tokenizer), cfg.eval_fraction])
        build = lambda folder: _build_hf(cfg, folder)  # noqa: E731
    folder = cache_root / f"{cfg.source}-{key}"
    with _locked(cache_root / f"{cfg.source}-{key}.lock"):
        if not (folder / "done").exists():
            build(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return folder, f"{key}/train", meta["vocab_size"]


def load_corpus(cfg: DataConfig) -> Corpus:
    folder, fingerprint, _ = prepare_corpus(cfg)
    key = fingerprint.split("/")[0]
    meta = json.loads((folder / "meta.json").read_text())
    splits = {
        name: TokenizedCorpus(
            tokens=_mapped(np.memmap(folder / f"{name}_tokens.bin", dtype=np.int32, mode="r")),
            doc_starts=_mapped(np.load(folder / f"{name}_doc_starts.npy", mmap_mode="r")),
            eos_id=meta["eos_id"],
            vocab_size=meta["vocab_size"],
            fingerprint=f"{key}/{name}",
        )
        for name in ("train", "eval")
    }
    return Corpus(train=splits["train"], eval=splits["eval"], tokenizer_dir=folder / "tokenizer")


def _mapped(array_: np.ndarray) -> torch.Tensor:
    # NOTE: a read-only mapping: the pages stay the file's, shared by every rank on the machine
    #       and read on demand. Copy-on-write (mode "c") would charge the whole file to each
    #       process's committed memory (ENOMEM where the kernel does not overcommit). torch warns
    #       that it cannot write such memory; nothing here does.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array_)


@contextlib.contextmanager
def _locked(path: Path):
    # One builder per store: the first process takes the lock, the rest wait and then read.
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # ENOLCK and kin: a filesystem without flock (builders then race: _publish)
            print(f"distrain: warning: {path} cannot be locked ({error.strerror}); building the token store unlocked", file=sys.stderr)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_hf_source(cfg: DataConfig) -> None:
    """Local data files and a local tokenizer must exist and hold something, or ConfigError."""
    for pattern in cfg.files:
        matches = glob.glob(os.path.expanduser(pattern))
        if not matches:
            raise ConfigError(f"data.files: {pattern} matches no file; check the path (a list: data.files=[a.jsonl,b.jsonl])")
        if all(os.path.isfile(m) and os.path.getsize(m) == 0 for m in matches):
            raise ConfigError(f"data.files: {pattern} is empty; point at files holding documents")
    tokenizer = cfg.tokenizer or ""
    local = Path(tokenizer).expanduser()
    looks_local = local.is_absolute() or tokenizer.startswith((".", "~")) or tokenizer.count("/") > 1
    if looks_local and not local.is_dir():
        raise ConfigError(f"data.tokenizer={tokenizer}: no such folder; pass a folder written by a tokenizer's save_pretrained, or a hub id")


def _files_fingerprint(patterns: list[str]) -> list:
    """Each local data file's absolute path, size and modification time (an edit changes them)."""
    files = sorted({os.path.abspath(f) for pattern in patterns for f in (glob.glob(os.path.expanduser(pattern)) or [pattern])})
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) if os.path.exists(f) else (f, None, None) for f in files]


def _tokenizer_fingerprint(tokenizer: str | None):
    """A local tokenizer folder by its files' names, sizes and times; a hub id by its name."""
    if tokenizer is None or not os.path.isdir(os.path.expanduser(tokenizer)):
        return tokenizer
    root = Path(tokenizer).expanduser()
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.iterdir()) if p.is_file()]


def _stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's first non-empty .py files in path order, up to `max_bytes`."""
    files, total = [], 0
    for path in _python_files(Path(sysconfig.get_paths()["stdlib"])):
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    return files


def _python_files(folder: Path):
    """The .py files under `folder` in the order of `sorted(folder.rglob("*.py"))`, lazily (a
    depth-first walk, each folder's entries by name), not entering installed packages: the
    corpus takes the first few, and listing the whole standard library took about 0.5 s."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and not entry.is_symlink():
            if entry.name not in ("site-packages", "dist-packages"):
                yield from _python_files(entry)
        elif entry.suffix == ".py":
            yield entry


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
    batches = ([enc.ids for enc in tokenizer.encode_batch(texts[i : i + 256])] for i in range(0, len(texts), 256))
    _write_store(folder, batches, len(texts), hf_tokenizer, cfg.eval_fraction, progress=False)


def _build_hf(cfg: DataConfig, folder: Path) -> None:
    import datasets
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.tokenizer={cfg.tokenizer}: does not load as a tokenizer ({str(error).splitlines()[0][:200]}); "
                          "pass a tokenizer folder or hub id") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer={cfg.tokenizer}: the tokenizer has no eos token; pick one that does")
    dataset = datasets.load_dataset(cfg.dataset, name=cfg.dataset_config, data_files=cfg.files or None, split=cfg.split)
    if cfg.text_field not in dataset.column_names:
        raise ConfigError(f"data.text_field={cfg.text_field}: not a column of {cfg.dataset}; columns: {dataset.column_names}")
    num_proc = cfg.num_proc or min(8, os.cpu_count() or 1)
    encoded = dataset.map(
        _Tokenize(tokenizer, cfg.text_field),
        batched=True,
        batch_size=1000,
        remove_columns=dataset.column_names,
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),  # not int64: half the cache's disk
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 2 * num_proc else None,
        desc=f"tokenizing ({num_proc} processes)",
    )
    _write_store(folder, _documents(encoded), len(encoded), tokenizer, cfg.eval_fraction, progress=True)
    for cache_file in encoded.cache_files:  # the tokenized Arrow copy: the store holds its tokens now
        if cache_file["filename"] not in {f["filename"] for f in dataset.cache_files}:
            Path(cache_file["filename"]).unlink(missing_ok=True)


def _documents(encoded) -> Iterable[list[np.ndarray]]:
    """The tokenized documents in batches, each an int32 view of the Arrow copy's column."""
    for table in encoded.with_format("arrow").iter(batch_size=10_000):
        column = table.column("ids").combine_chunks()
        values, offsets = column.flatten().to_numpy(), column.offsets.to_numpy()
        offsets = offsets - offsets[0]
        yield [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


class _Tokenize:
    """`datasets.map`'s function (a class, so that its worker processes can pickle it)."""

    def __init__(self, tokenizer, field: str):
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, batch):
        return {"ids": self.tokenizer(batch[self.field], add_special_tokens=False)["input_ids"]}


def _write_store(folder: Path, batches: Iterable, num_docs: int, tokenizer, eval_fraction: float, progress: bool) -> None:
    """Stream documents (batches of token-id sequences, in document order) into the store's files."""
    eos_id = tokenizer.eos_token_id
    num_eval = max(1, round(eval_fraction * num_docs))
    if num_docs - num_eval < 1:
        raise ConfigError(f"data: only {num_docs} documents; need at least 2 to hold some out for eval (check data.files)")
    held_out = np.zeros(num_docs, dtype=bool)
    held_out[np.random.default_rng(_EVAL_SEED).choice(num_docs, size=num_eval, replace=False)] = True
    tmp = _build_folder(folder)
    tmp.mkdir(parents=True)
    lengths = {"train": array("q"), "eval": array("q")}  # 8 bytes a document, not a Python int each
    started, doc, tokens = time.monotonic(), 0, 0
    bar = _progress(num_docs) if progress else None
    with open(tmp / "train_tokens.bin", "wb") as train_file, open(tmp / "eval_tokens.bin", "wb") as eval_file:
        files = {"train": train_file, "eval": eval_file}
        for batch in batches:
            rows = {"train": [], "eval": []}
            for ids in batch:
                split = "eval" if held_out[doc] else "train"
                rows[split] += [np.asarray(ids, dtype=np.int32), np.full(1, eos_id, dtype=np.int32)]
                lengths[split].append(len(ids) + 1)
                doc += 1
                tokens += len(ids) + 1
            for split, pieces in rows.items():
                if pieces:
                    files[split].write(np.concatenate(pieces).tobytes())
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
    if bar is not None:
        bar.close()
    if doc != num_docs:
        raise RuntimeError(f"token store: {doc} documents written, {num_docs} expected")
    for split, sizes in lengths.items():
        sizes = np.asarray(sizes, dtype=np.int64)
        np.save(tmp / f"{split}_doc_starts.npy", np.cumsum(sizes) - sizes)
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps({
        "eos_id": eos_id, "vocab_size": len(tokenizer), "version": STORE_VERSION, "documents": num_docs, "tokens": tokens,
        "eval_documents": num_eval, "build_seconds": round(time.monotonic() - started, 2),
    }))
    (tmp / "done").touch()
    _publish(tmp, folder)


def _build_folder(folder: Path) -> Path:
    """This process's temporary build folder; those of dead builders on this machine go."""
    prefix = f"{folder.name}.tmp-{socket.gethostname()}-"
    for stale in folder.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return folder.with_name(f"{prefix}{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the built store into place, unless another builder's complete one got there first
    (a store's content is fixed by its key: either will do)."""
    if not (folder / "done").exists():
        try:
            os.replace(tmp, folder)
            return
        except OSError:  # a non-empty folder: another builder renamed its own in meanwhile
            if not (folder / "done").exists():
                raise
    shutil.rmtree(tmp, ignore_errors=True)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="writing the token store", dynamic_ncols=True, mininterval=2.0)
