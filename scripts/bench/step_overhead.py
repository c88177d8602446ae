"""Step time of distrain at world size 1 against a plain PyTorch loop on the same model and data.

    python scripts/bench/step_overhead.py [--recipe qwen3_moe_debug] [--steps 10] [--rounds 5] [key=value ...]

Both loops run in this process on the same initial weights and the same batches, interleaved
in rounds (distrain, plain, distrain, ...) so that machine noise hits both alike. The plain loop
is what one would write by hand: forward, summed cross-entropy over the global target count,
backward, clip_grad_norm_, AdamW (foreach). Goal: distrain within 5% (ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _report import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="qwen3_moe_debug")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from distrain.config import load_job
    from distrain.data.packing import IGNORE_INDEX
    from distrain.launch.worker import init_distributed, resolve_device
    from distrain.models import build_config
    from distrain.parallel.parallelize import full_random_state
    from distrain.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="distrain-bench-")
    # (weight decay on every parameter, as the plain loop's AdamW applies it)
    job = load_job(args.recipe, [f"run.dir={run_dir}", "eval.interval=0", "logging.wandb.mode=disabled", "optim.decay_norms_and_biases=true", *args.overrides])
    device = resolve_device(job)
    init_distributed(job, device)
    trainer = Trainer(job, device)
    batches = [trainer.train_loader.next_batch() for _ in range(args.steps)]

    from transformers import AutoModelForCausalLM

    hf_config = build_config(job.model)
    plain = AutoModelForCausalLM.from_config(hf_config, attn_implementation=job.model.attn_implementation).to(device)
    plain.load_state_dict(full_random_state(hf_config, job.run.seed))
    plain.train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=job.optim.lr, betas=(job.optim.beta1, job.optim.beta2),
                                  eps=job.optim.eps, weight_decay=job.optim.weight_decay, foreach=True)

    def plain_step(micro_batches):
        num_targets = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches).item()
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            logits = plain(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            (loss / num_targets).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), job.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(step_fn) -> list[float]:
        times = []
        for micro_batches in batches:
            start = time.perf_counter()
            step_fn(micro_batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times

    timed(trainer.train_step), timed(plain_step)  # warm-up
    distrain_times, plain_times = [], []
    for _ in range(args.rounds):
        distrain_times += timed(trainer.train_step)
        plain_times += timed(plain_step)
    d, p = statistics.median(distrain_times), statistics.median(plain_times)
    tokens = job.train.global_batch_size * job.train.seq_len
    rows = [
        {"loop": "plain PyTorch", "median_step_s": p, "tokens_per_s": tokens / p, "ratio": 1.0},
        {"loop": "distrain (world 1)", "median_step_s": d, "tokens_per_s": tokens / d, "ratio": d / p},
    ]
    report("step_overhead", rows, args.out, {"recipe": args.recipe, "overrides": args.overrides, "device": str(device),
                                             "steps_per_round": args.steps, "rounds": args.rounds, "goal": "ratio <= 1.05"})
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
