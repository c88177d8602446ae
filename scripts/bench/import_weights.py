"""Pretrained weights into a sharded model: distrain's shard-on-read import against loading the
model whole on rank 0 (`from_pretrained`) and broadcasting it (what distrain did before).

    python scripts/bench/import_weights.py [--layers 24] [--rounds 2] [--nproc 4] [--out results/bench]

A Llama of about 1.2 GB (fp32; hidden 1024, `--layers` layers, vocab 8192) is built once and saved
with `save_pretrained` (2 GB shards). Then, in alternating rounds, `--nproc` gloo ranks (FSDP,
dp_shard=N) build distrain's Trainer from it with each method; per rank: the seconds of the fill
(after the parameters are allocated) and how far the rank's resident memory rose from before the
Trainer to the end of the fill (its own counters: /proc/self/clear_refs resets the peak, VmHWM
reads it). The table gives the medians over rounds of the slowest rank's time and the largest rank's rise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _status(field: str) -> int:
    return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def worker(method: str, folder: str, cache: str, run_dir: str) -> None:
    """On every rank (started by torch.distributed.run): build the Trainer, measure the fill."""
    import torch.distributed as dist
    from layouts import trainer_in_own_group

    import distrain.train.trainer as trainer_module
    from distrain.config import load_job
    from distrain.models import build_config, meta_model

    world = int(os.environ["WORLD_SIZE"])
    overrides = ["model=pretrained", f"model.name_or_path={folder}", "data.vocab_size=1024", "data.max_bytes=600000", f"data.cache_dir={cache}",
                 "train.seq_len=32", f"train.global_batch_size={world}", "train.micro_batch_size=1", f"run.dir={run_dir}",
                 f"launcher.nproc_per_node={world}", f"parallel.dp_shard={world}", "checkpoint.export=false"]
    meta_model(build_config(load_job("llama_debug", overrides).model))  # modeling code imported before the baseline
    measured = {}

    def timed(function):
        def run(*args):
            start = time.perf_counter()
            function(*args)
            measured.update(seconds=time.perf_counter() - start, peak=_status("VmHWM"))
        return run

    if method == "rank0_broadcast":
        trainer_module.safetensors_folder = lambda name: None  # as before: from_pretrained whole on rank 0, broadcast
    trainer_module.load_sharded = timed(trainer_module.load_sharded)
    trainer_module.fill_from_rank0 = timed(trainer_module.fill_from_rank0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    with trainer_in_own_group("llama_debug", overrides):
        row = {"rank": int(os.environ["RANK"]), "fill_s": measured["seconds"], "rise_bytes": measured["peak"] - before,
               "trainer_s": time.perf_counter() - start}
        rows = [None] * world
        dist.all_gather_object(rows, row)
    if row["rank"] == 0:
        print("RESULT " + json.dumps(rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "FOLDER", "CACHE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch
    from _report import report
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
                                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model_bytes = sum(p.numel() * 4 for p in model.parameters())
        model.save_pretrained(tmp / "model", max_shard_size="2GB")
        del model
        results = {"shard_on_read": [], "rank0_broadcast": []}
        for _ in range(args.rounds):
            for method in results:
                command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--master-port=29613", __file__,
                           "--worker", method, str(tmp / "model"), str(tmp / "cache"), str(tmp / f"run-{method}")]
                out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{method} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                results[method].append(json.loads(line[len("RESULT "):]))
    rows = []
    for method, rounds in results.items():
        rows.append({
            "method": method, "model MB": round(model_bytes / 1e6), "ranks": args.nproc,
            "fill s (slowest rank)": round(statistics.median(max(r["fill_s"] for r in ranks) for ranks in rounds), 2),
            "memory rise MB (largest rank)": round(statistics.median(max(r["rise_bytes"] for r in ranks) for ranks in rounds) / 1e6),
            "memory rise / model": round(statistics.median(max(r["rise_bytes"] for r in ranks) for ranks in rounds) / model_bytes, 2),
        })
    report("import_weights", rows, args.out, {"rounds": args.rounds, "shard MB (fp32, ideal)": round(model_bytes / args.nproc / 1e6)})


if __name__ == "__main__":
    main()
