"""Corpus, packing and the global-position loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distrain.config.schema import DataConfig
from distrain.data.corpus import TokenizedCorpus, load_corpus
from distrain.data.loader import GlobalBatchLoader
from distrain.data.packing import IGNORE_INDEX, PackedDataset


@pytest.fixture(scope="module")
def corpus(data_cache):
    return load_corpus(DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=str(data_cache)))


def synthetic(doc_lengths: list[int], eos_id: int = 0) -> TokenizedCorpus:
    docs = [torch.randint(1, 50, (n - 1,)).tolist() + [eos_id] for n in doc_lengths]
    lengths = torch.tensor(doc_lengths)
    return TokenizedCorpus(
        tokens=torch.tensor([t for d in docs for t in d], dtype=torch.int32),
        doc_starts=torch.cumsum(lengths, 0) - lengths,
        eos_id=eos_id,
        vocab_size=50,
        fingerprint="synthetic",
    )


def test_stdlib_corpus_is_cached_and_round_trips(corpus, data_cache):
    from transformers import AutoTokenizer

    again = load_corpus(DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=str(data_cache)))
    assert torch.equal(again.train.tokens, corpus.train.tokens) and again.train.fingerprint == corpus.train.fingerprint
    assert corpus.train.vocab_size == 1024 and corpus.eval.tokens.numel() > 0
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer_dir)
    start, end = corpus.train.doc_starts[:2].tolist()
    text = tokenizer.decode(corpus.train.tokens[start : end - 1].tolist())
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == corpus.train.tokens[start : end - 1].tolist()
    assert corpus.train.tokens[end - 1] == tokenizer.eos_token_id


def test_stdlib_files_come_in_sorted_path_order_without_installed_packages(tmp_path):
    """The lazy walk (`_python_files`) yields exactly `sorted(rglob("*.py"))` outside installed
    packages: a folder before a file named like it plus ".py", nested folders, a symlinked folder."""
    from distrain.data.corpus import _python_files

    for name in ["json/__init__.py", "json.py", "a/b/c.py", "a/b.py", "a/b/z/x.py", "a_b.py", "A.py", "site-packages/p.py",
                 "x/dist-packages/q.py", "notes.txt", "x/y.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    expected = [p for p in sorted(tmp_path.rglob("*.py")) if not {"site-packages", "dist-packages"} & set(p.parts)]
    assert list(_python_files(tmp_path)) == expected and len(expected) == 8


def test_store_files_are_mapped_read_only_and_shared(corpus):
    """The token files are shared read-only mappings ("r--s"): a private writable (copy-on-write)
    one would charge the whole file to every rank's committed memory."""
    mappings = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(("_tokens.bin", "_doc_starts.npy"))]
    names = {m[-1].rsplit("/", 1)[1] for m in mappings}
    assert {"train_tokens.bin", "train_doc_starts.npy"} <= names, mappings
    assert {m[1] for m in mappings} == {"r--s"}, mappings


def test_packing_keeps_every_token_once_and_labels_stay_in_document():
    torch.manual_seed(0)
    data = synthetic([5, 17, 3, 40, 9, 1, 12])  # 87 tokens -> 6 samples of 16, the last padded
    packed = PackedDataset(data, seq_len=16)
    samples = [packed[i] for i in range(len(packed))]
    assert len(samples) == 6
    stream = torch.cat([s["input_ids"] for s in samples])
    assert torch.equal(stream[: data.tokens.numel()], data.tokens.long())  # each token once, in order
    starts = set(data.doc_starts.tolist())
    for i, s in enumerate(samples):
        for t in range(16):
            g = i * 16 + t  # global token index
            if g >= data.tokens.numel():
                assert s["labels"][t] == IGNORE_INDEX and s["position_ids"][t] == 0  # padding
                continue
            same_doc_next = t + 1 < 16 and g + 1 < data.tokens.numel() and (g + 1) not in starts
            assert s["labels"][t] == (data.tokens[g + 1] if same_doc_next else IGNORE_INDEX)
            restart = t == 0 or g in starts
            assert (s["position_ids"][t] == 0) == restart
            if not restart:
                assert s["position_ids"][t] == s["position_ids"][t - 1] + 1


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# the parity suite's architectures, and models whose forward ignores restarting position ids
ISOLATION_CASES = {
    "llama": {}, "qwen3": dict(head_dim=8), "mistral": {}, "gemma": dict(head_dim=8), "phi3": {}, "stablelm": {},
    "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=64), "mpt": dict(d_model=32, n_heads=4, n_layers=2, vocab_size=64),
}
LEAKING = {"bloom", "mpt", "gpt_oss"}  # alibi without position ids (Bloom, MPT); GPT-OSS's masks (transformers 5.24)


@pytest.mark.parametrize("architecture", list(ISOLATION_CASES))
def test_packed_documents_are_isolated_or_refused(architecture):
    """A packed sample's documents through the model's real forward at the test's sizes, against
    each document alone: either isolated within 1e-5, and distrain's start-up check passes, or
    not, and the check refuses the run before spawn naming data.document_masking."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from distrain.cli import _check_document_masking
    from distrain.config import ConfigError

    eager = architecture in ("bloom", "mpt", "gpt_oss")
    config = AutoConfig.for_model(architecture, **{**(SMALL if architecture not in ("bloom", "mpt") else {}), **ISOLATION_CASES[architecture]})
    config._attn_implementation = "eager" if eager else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation).eval()
    sample = PackedDataset(synthetic([7, 12, 13]), seq_len=32)[0]
    with torch.no_grad():
        packed = model(input_ids=sample["input_ids"][None], position_ids=sample["position_ids"][None], use_cache=False).logits[0]
        leak = max(
            (packed[begin:end] - model(input_ids=sample["input_ids"][None, begin:end], use_cache=False).logits[0]).abs().max().item()
            for begin, end in [(0, 7), (7, 19), (19, 32)]
        )
    assert (leak > 1e-5) == (architecture in LEAKING), leak
    job = SimpleNamespace(data=SimpleNamespace(document_masking=True))
    if architecture in LEAKING:
        with pytest.raises(ConfigError, match="data.document_masking=false"):
            _check_document_masking(job, config)
        job.data.document_masking = False
    _check_document_masking(job, config)  # passes


def loader(dataset, dp_rank=0, dp_size=1, seed=3):
    return GlobalBatchLoader(dataset, global_batch_size=8, micro_batch_size=2, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def global_batch(micro_batches) -> torch.Tensor:
    return torch.cat([mb["input_ids"] for mb in micro_batches])


def test_resume_continues_the_same_samples_under_another_dp_size(corpus):
    dataset = PackedDataset(corpus.train, seq_len=64)
    reference = loader(dataset)
    # run past an epoch boundary so the reshuffle is covered too
    num_steps = len(dataset) // 8 + 3
    expected = [global_batch(reference.next_batch()) for _ in range(num_steps)]
    assert not torch.equal(expected[0], expected[1])

    stopped = loader(dataset)
    for _ in range(num_steps - 4):
        stopped.next_batch()
    state = stopped.state_dict()
    assert state["position"] == (num_steps - 4) * 8

    resumed = loader(dataset)
    resumed.load_state_dict(state)
    for step in range(num_steps - 4, num_steps):
        assert torch.equal(global_batch(resumed.next_batch()), expected[step])

    # replayed as 2 data-parallel ranks: rank 0 then rank 1 together make each global batch
    ranks = [loader(dataset, dp_rank=r, dp_size=2) for r in range(2)]
    for rank_loader in ranks:
        rank_loader.load_state_dict(state)
        assert rank_loader.grad_accum_steps == 2
    for step in range(num_steps - 4, num_steps):
        assert torch.equal(torch.cat([global_batch(r.next_batch()) for r in ranks]), expected[step])


def test_shuffle_is_deterministic_from_the_seed(corpus):
    dataset = PackedDataset(corpus.train, seq_len=64)
    first = global_batch(loader(dataset, seed=1).next_batch())
    assert torch.equal(first, global_batch(loader(dataset, seed=1).next_batch()))
    assert not torch.equal(first, global_batch(loader(dataset, seed=2).next_batch()))


def test_resume_rejects_other_data(corpus):
    dataset = PackedDataset(corpus.train, seq_len=64)
    state = loader(dataset).state_dict() | {"fingerprint": "something-else"}
    with pytest.raises(ValueError, match="fingerprint"):
        loader(dataset).load_state_dict(state)


def _documents(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "for", "in", "range", "import", "class", "None", "yield", "with"]
    return [f"# doc {i}\n" + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(count)]


def _store_documents(split) -> list[list[int]]:
    ends = split.doc_starts[1:].tolist() + [split.tokens.numel()]
    return [split.tokens[start:end].tolist() for start, end in zip(split.doc_starts.tolist(), ends)]


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_token_store_holds_each_document_tokenized_alone(tmp_path, corpus, fmt):
    """A local jsonl / parquet dataset, tokenized by `datasets.map` in 2 processes into the store:
    each document is exactly the tokenizer's ids for it alone plus eos, none lost or repeated,
    the train split in the file's order."""
    import json

    import datasets
    from transformers import AutoTokenizer

    texts = _documents(240)
    path = tmp_path / f"docs.{'jsonl' if fmt == 'json' else 'parquet'}"
    if fmt == "json":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).to_parquet(str(path))
    cfg = DataConfig(source="hf", dataset=fmt, files=[str(path)], tokenizer=str(corpus.tokenizer_dir), cache_dir=str(tmp_path / "cache"),
                     eval_fraction=0.05, num_proc=2)
    store = load_corpus(cfg)
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer_dir)
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    train, held_out = _store_documents(store.train), _store_documents(store.eval)
    assert len(held_out) == 12 and len(train) == 228
    assert sorted(train + held_out) == sorted(expected)
    position = {tuple(ids): i for i, ids in enumerate(expected)}
    assert [position[tuple(d)] for d in train] == sorted(position[tuple(d)] for d in train)
    assert store.train.tokens.dtype == torch.int32 and store.train.doc_starts.dtype == torch.int64


def test_token_store_is_reused_and_an_edited_file_rebuilds(tmp_path, corpus):
    from distrain.data.corpus import prepare_corpus

    path = tmp_path / "docs.jsonl"
    path.write_text("".join('{"text": "%s"}\n' % t.replace("\n", " ") for t in _documents(50)))
    cfg = DataConfig(source="hf", dataset="json", files=[str(path)], tokenizer=str(corpus.tokenizer_dir), cache_dir=str(tmp_path / "cache"),
                     num_proc=1)
    folder, fingerprint, _ = prepare_corpus(cfg)
    built = (folder / "done").stat().st_mtime_ns
    again, same_fingerprint, _ = prepare_corpus(cfg)
    assert (again, same_fingerprint) == (folder, fingerprint) and (folder / "done").stat().st_mtime_ns == built  # reused, not rebuilt
    with open(path, "a") as handle:
        handle.write('{"text": "one more document"}\n')
    edited, other_fingerprint, _ = prepare_corpus(cfg)
    assert edited != folder and other_fingerprint != fingerprint
    meta = lambda f: __import__("json").loads((f / "meta.json").read_text())  # noqa: E731
    assert meta(edited)["documents"] == meta(folder)["documents"] + 1 == 51


MEMORY_PROBE = r"""
import sys
from distrain.config.schema import DataConfig
from distrain.data.corpus import load_corpus
from distrain.data.loader import GlobalBatchLoader
from distrain.data.packing import PackedDataset

def rss_anon_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1])

cfg = DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=sys.argv[1])
import distrain.data.corpus as corpus_module
corpus_module.prepare_corpus = lambda cfg: (__import__("pathlib").Path(sys.argv[2]), "probe/train", 1024)
before = rss_anon_kib()
corpus = load_corpus(cfg)
dataset = PackedDataset(corpus.train, seq_len=64)
loader = GlobalBatchLoader(dataset, 8, 4, 0, 1, seed=0)
for _ in range(200):
    loader.next_batch()
print(rss_anon_kib() - before, corpus.train.tokens.numel())
"""


def test_training_memory_does_not_grow_with_the_store(tmp_path, corpus, data_cache):
    """A rank's anonymous memory (its own counter, /proc/self/status RssAnon) while it opens a
    store and draws 200 batches is the same for a store 20x the test corpus: tokens and document
    offsets stay in the mapped files."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from distrain.data.corpus import _write_store

    docs = _store_documents(corpus.train)
    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer_dir)
    stores = {}
    for copies in (1, 20):
        folder = tmp_path / f"x{copies}"
        batches = ([d[:-1] for d in docs] for _ in range(copies))
        _write_store(folder, batches, copies * len(docs), tokenizer, 0.02, progress=False)
        stores[copies] = folder
    grown = {}
    for copies, folder in stores.items():
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(data_cache), str(folder)], capture_output=True, text=True, check=True)
        kib, tokens = map(int, out.stdout.split())
        grown[copies] = (kib, tokens)
    (small, small_tokens), (large, large_tokens) = grown[1], grown[20]
    assert large_tokens > 19 * small_tokens
    # loading the 20x store whole would add 4 bytes a token (16x the small store's 4): far above this
    assert large - small < 0.1 * 4 * large_tokens / 1024, grown


def test_token_store_builders_that_race_keep_one_store(tmp_path, corpus, monkeypatch):
    """Builders the lock does not serialize (node-local locks, no locks): each writes a folder of
    its own and the first rename wins; another's finished store is kept, ours dropped. A dead
    builder's folder on this machine is cleaned up, a live one's and another machine's are not.
    The tokenized Arrow copy holds int32 ids (int64 would double its disk)."""
    import os
    import socket

    import distrain.data.corpus as corpus_module

    path = tmp_path / "docs.jsonl"
    path.write_text("".join('{"text": "%s"}\n' % t.replace("\n", " ") for t in _documents(30)))
    cfg = DataConfig(source="hf", dataset="json", files=[str(path)], tokenizer=str(corpus.tokenizer_dir), cache_dir=str(tmp_path / "cache"),
                     num_proc=1)
    dead = 2**22 + 1  # no such pid (past the largest pid_max)
    write_store, seen = corpus_module._write_store, {}

    def other_builder_first(folder, batches, *args, **kwargs):
        batches = list(batches)
        seen["dtype"] = batches[0][0].dtype
        host = socket.gethostname()
        for name in (f"tmp-{host}-{dead}", f"tmp-{host}-{os.getppid()}", f"tmp-{host}x-{dead}"):
            (folder.parent / f"{folder.name}.{name}").mkdir()
        write_store(folder, iter(batches), *args, **kwargs)  # another builder's store, published
        (folder / "theirs").touch()
        write_store(folder, iter(batches), *args, **kwargs)  # then ours

    monkeypatch.setattr(corpus_module, "_write_store", other_builder_first)
    folder, _, _ = corpus_module.prepare_corpus(cfg)
    assert seen["dtype"] == np.int32
    assert (folder / "theirs").exists() and (folder / "done").exists()
    left = sorted(p.name.split(".", 1)[1] for p in folder.parent.glob(f"{folder.name}.tmp-*"))
    host = socket.gethostname()
    assert left == sorted([f"tmp-{host}-{os.getppid()}", f"tmp-{host}x-{dead}"]), left
    monkeypatch.undo()
    store = load_corpus(cfg)
    assert store.train.tokens.numel() > 0
