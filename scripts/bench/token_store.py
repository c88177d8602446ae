"""The token store: build throughput, and a rank's memory while training against loading tokens whole.

    python scripts/bench/token_store.py [--mb 40] [--procs 1 2] [--out results/bench]

1. Build: a local jsonl of `--mb` MB of generated text (documents of 50-2000 words) is tokenized into
   a store with the stdlib corpus's tokenizer (byte-level BPE, 1024 tokens), once per `--procs`
   value (`data.num_proc`), each in a fresh process with an empty `datasets` cache; tokens/s and
   documents/s of the whole build (`datasets` load into Arrow, map, write), on this machine's cores.
2. Memory: in a fresh process each, a rank opens the store and draws 200 batches of 8 x 256 tokens,
   (a) through distrain's loader (memory-mapped store) and (b) as the loader before the store did:
   the tokens read whole into memory plus a per-token document-start mask. The process's own
   counter (RssAnon, anonymous memory: what is not the file's shared page cache) before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROBE = r"""
import sys
import numpy as np
import torch
from distrain.data.corpus import TokenizedCorpus, load_corpus
from distrain.data.loader import GlobalBatchLoader
from distrain.data.packing import PackedDataset
from distrain.config.schema import DataConfig
import distrain.data.corpus as corpus_module

def rss_anon_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024

folder, mode = sys.argv[1], sys.argv[2]
from pathlib import Path
corpus_module.prepare_corpus = lambda cfg: (Path(folder), "bench/train", 0)
before = rss_anon_mib()
train = load_corpus(DataConfig()).train
if mode == "whole":  # the loader before the store: every token in memory, plus a mask per token
    tokens = torch.from_numpy(np.fromfile(Path(folder) / "train_tokens.bin", dtype=np.int32))
    is_start = torch.zeros(tokens.numel(), dtype=torch.bool)
    is_start[train.doc_starts] = True
    train = TokenizedCorpus(tokens, train.doc_starts.clone(), train.eos_id, train.vocab_size, train.fingerprint)
loader = GlobalBatchLoader(PackedDataset(train, 256), 8, 8, 0, 1, seed=0)
for _ in range(200):
    loader.next_batch()
print(rss_anon_mib() - before)
"""


def _jsonl(path: Path, megabytes: float) -> int:
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "for", "in", "range", "import", "class", "None", "yield", "with", "lambda", "x", "y"]
    written = docs = 0
    with open(path, "w") as handle:
        while written < megabytes * 1e6:
            line = json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 2000)))}) + "\n"
            handle.write(line)
            written += len(line)
            docs += 1
    return docs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=40)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    from _report import report

    from distrain.config.schema import DataConfig
    from distrain.data.corpus import load_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = load_corpus(DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=str(tmp / "stdlib"))).tokenizer_dir
        docs = _jsonl(tmp / "docs.jsonl", args.mb)
        folder = None
        for procs in args.procs:
            cfg = DataConfig(source="hf", dataset="json", files=[str(tmp / "docs.jsonl")], tokenizer=str(tokenizer_dir),
                             cache_dir=str(tmp / f"cache{procs}"), num_proc=procs)
            # in a process of its own with an empty `datasets` cache, so nothing is reused between builds
            env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / f"hf{procs}"))
            code = ("import sys, time; from distrain.config.schema import DataConfig; from distrain.data.corpus import prepare_corpus; "
                    "cfg = DataConfig(**__import__('json').loads(sys.argv[1])); start = time.perf_counter(); "
                    "folder = prepare_corpus(cfg)[0]; print(time.perf_counter() - start, folder)")
            out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))], env=env, capture_output=True, text=True, check=True)
            seconds, folder = float(out.stdout.split()[-2]), Path(out.stdout.split()[-1])
            tokens = json.loads((folder / "meta.json").read_text())["tokens"]
            rows.append({"what": f"build, num_proc={procs}", "documents": docs, "tokens": tokens, "seconds": round(seconds, 2),
                         "tokens/s": round(tokens / seconds), "documents/s": round(docs / seconds)})
        for mode in ("mapped", "whole"):
            out = subprocess.run([sys.executable, "-c", PROBE, str(folder), mode], capture_output=True, text=True, check=True)
            rows.append({"what": f"training memory, {'token store (mapped)' if mode == 'mapped' else 'tokens loaded whole (before)'}",
                         "tokens": tokens, "RssAnon growth MiB": round(float(out.stdout.split()[-1]), 1)})
    for row in rows:
        for key in ("documents", "seconds", "tokens/s", "documents/s", "RssAnon growth MiB"):
            row.setdefault(key, "")
    report("token_store", rows, args.out, {"text MB": args.mb, "tokenizer": "stdlib byte-level BPE, 1024 tokens"})


if __name__ == "__main__":
    main()
