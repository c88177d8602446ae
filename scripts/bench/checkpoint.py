"""What checkpoints cost: save and load throughput against torch.save / torch.load of the same
bytes on the same disk, and the training time a save blocks, synchronous against async.

    python scripts/bench/checkpoint.py [--recipe llama_debug] [--rounds 3] [--steps 8] [--interval 4] [key=value ...]

World size 1, in this process, on `run.device` (auto: CUDA when there is one); by default a
~60M-parameter Llama (overrides below): its state
(fp32 weights + two AdamW moments, 12 bytes per parameter) is about 700 MB in tensors of a few
MB each, as a rank's shard of a real model is (per-tensor overheads dominate smaller ones).

1. Throughput, `rounds` alternating rounds in the run directory's folder: distrain's save
   (`Trainer.save`: DCP files fsynced, rename, train state, tokenizer) against `torch.save` of a
   dict of the same tensors plus an fsync (what a durable checkpoint needs), and distrain's
   resume load (`load_checkpoint`: DCP into the sharded model and optimizer) against `torch.load`
   plus copying into the same tensors. Median GB/s of state bytes; goal ratio >= 0.8.
   Before
   each load the page cache is dropped where this process may (root on Linux), so loads read
   the disk as a resume does; the JSON says whether it could.
2. Blocking: `steps` training steps with a save every `interval` steps, once with synchronous
   saves and once with `checkpoint.async=true`; per save, the time the training loop waits
   (the `save()` call: for async the copy to host memory), median over the saves, in seconds and
   in median step times, the first save's apart; and apart, the wait for the previous async save
   still writing, which is zero unless saves come faster than the disk writes them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import report  # noqa: E402

MEDIUM = [
    "++model.config.hidden_size=1024", "++model.config.intermediate_size=2816", "++model.config.num_hidden_layers=4",
    "++model.config.num_attention_heads=8", "++model.config.num_key_value_heads=4",
    "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=256",
]


def build(recipe: str, run_dir: str, overrides: list[str], async_save: bool, device: torch.device):
    from distrain.config import load_job, write_config_yaml
    from distrain.data.corpus import prepare_corpus
    from distrain.train.trainer import Trainer

    job = load_job(recipe, [f"run.dir={run_dir}", "eval.interval=0", "checkpoint.keep=1", f"checkpoint.async={str(async_save).lower()}",
                            "logging.wandb.mode=disabled", *MEDIUM, *overrides])
    prepare_corpus(job.data)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_config_yaml(job, Path(run_dir) / "config.yaml")
    return job, Trainer(job, device)


def state_tensors(trainer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{n}": p.detach() for n, p in trainer.model.named_parameters()}
    for i, (param, state) in enumerate(trainer.optimizer.state.items()):
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0})
    return tensors


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def throughput(trainer, folder: Path, rounds: int) -> tuple[list[dict], bool]:
    """Each side keeps one copy: a save writes new files and removes the previous copy (distrain:
    checkpoint.keep=1, waited for; torch: unlink), so both write to pages freed alike. One
    round first, untimed, warms both paths."""
    from distrain.checkpoint.dcp import load_checkpoint

    tensors = state_tensors(trainer)
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    times = {"distrain save": [], "torch.save": [], "distrain load": [], "torch.load": []}
    cold = False
    for round_ in range(rounds + 1):
        trainer.step += 1  # a new checkpoint name each round
        start = time.perf_counter()
        path = trainer.save()
        trainer.checkpointer.wait()
        distrain_save = time.perf_counter() - start
        plain, previous = folder / f"plain-{round_}.pt", folder / f"plain-{round_ - 1}.pt"
        start = time.perf_counter()
        torch.save(tensors, plain)
        with open(plain, "rb+") as f:
            os.fsync(f.fileno())
        previous.unlink(missing_ok=True)
        torch_save = time.perf_counter() - start
        cold = drop_page_cache()
        start = time.perf_counter()
        load_checkpoint(path, trainer.model, trainer.optimizer, "dp_0")
        distrain_load = time.perf_counter() - start
        drop_page_cache()
        start = time.perf_counter()
        loaded = torch.load(plain, weights_only=True)
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(loaded[name])
        torch_load = time.perf_counter() - start
        del loaded
        if round_ > 0:
            for key, value in zip(times, (distrain_save, torch_save, distrain_load, torch_load)):
                times[key].append(value)
    plain.unlink()
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for kind in ("save", "load"):
        for key in [f"torch.{kind}"] + [k for k in times if k.startswith(f"distrain {kind}")]:
            rows.append({"what": key, "state_MB": num_bytes / 2**20, "median_s": medians[key], "GB_per_s": num_bytes / medians[key] / 1e9,
                         "ratio_vs_torch": medians[f"torch.{kind}"] / medians[key]})
    return rows, cold


def blocking(recipe: str, overrides: list[str], steps: int, interval: int, async_save: bool, device: torch.device) -> dict:
    run_dir = tempfile.mkdtemp(prefix="distrain-bench-ckpt-")
    _, trainer = build(recipe, run_dir, overrides, async_save, device)
    step_times, waited, called = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(trainer.train_loader.next_batch())
        trainer.step += 1
        trainer.checkpointer.poll()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        if trainer.step % interval == 0:
            start = time.perf_counter()
            trainer.checkpointer.wait()  # a save still writing (async): only when saves come faster than the disk
            waited.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.save()
            called.append(time.perf_counter() - start)
    start = time.perf_counter()
    trainer.checkpointer.wait()
    tail = time.perf_counter() - start
    step = statistics.median(step_times)
    # NOTE: the first async save also allocates the host copies kept for the run (pinning is slow)
    return {"mode": "async" if async_save else "sync", "saves": len(called), "median_step_s": step, "first_save_s": called[0],
            "save_call_s": statistics.median(called), "steps_blocked_per_save": statistics.median(called) / step,
            "waited_for_previous_s": statistics.median(waited), "final_wait_s": tail}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="llama_debug")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--only", choices=["throughput", "blocking"], help="run one part")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from distrain.config import load_job
    from distrain.launch.worker import init_distributed, resolve_device

    job = load_job(args.recipe, args.overrides)
    device = resolve_device(job)
    init_distributed(job, device)
    if args.only != "blocking":
        run_dir = tempfile.mkdtemp(prefix="distrain-bench-ckpt-")
        _, trainer = build(args.recipe, run_dir, args.overrides, async_save=False, device=device)
        trainer.train_step(trainer.train_loader.next_batch())  # Adam states exist from here on
        rows, cold = throughput(trainer, Path(run_dir), args.rounds)
        report("checkpoint_throughput", rows, args.out, {"recipe": args.recipe, "device": str(device), "overrides": MEDIUM + args.overrides,
                                                         "rounds": args.rounds, "folder": run_dir, "cold_loads": cold, "goal": "ratio_vs_torch >= 0.8"})
        del trainer
    if args.only == "throughput":
        return
    rows = [blocking(args.recipe, args.overrides, args.steps, args.interval, async_save, device) for async_save in (False, True)]
    report("checkpoint_blocking", rows, args.out, {"recipe": args.recipe, "device": str(device), "overrides": MEDIUM + args.overrides, "steps": args.steps,
                                                   "interval": args.interval})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
