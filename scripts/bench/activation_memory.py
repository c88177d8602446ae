"""`distrain plan`'s activation estimate against the memory a training step really takes, on CUDA.

    python scripts/bench/activation_memory.py [key=value ...]     (a GPU machine; world size 1, bf16)

For each activation-checkpointing mode: one warm-up step, then the peak of
`torch.cuda.max_memory_allocated` during a step above what was allocated before it (the state:
weights, Adam states, and the gradients, allocated beforehand), against the estimate
`activation_bytes` (activations + the loss's logits) plus the bf16 copies of the weights that
autocast keeps for the step at world size 1 (under FSDP the gathered bf16 blocks stand there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import report  # noqa: E402

MODEL = [
    "++model.config.hidden_size=1024", "++model.config.num_hidden_layers=8", "++model.config.num_attention_heads=16",
    "++model.config.num_key_value_heads=4", "++model.config.head_dim=64", "++model.config.num_experts=16",
    "++model.config.num_experts_per_tok=4", "++model.config.moe_intermediate_size=512", "++model.config.vocab_size=32000",
    "train.seq_len=2048", "train.micro_batch_size=2", "train.global_batch_size=2", "train.mixed_precision=bf16",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from distrain.config import load_job, write_config_yaml
    from distrain.data.corpus import prepare_corpus
    from distrain.launch.worker import init_distributed, resolve_device
    from distrain.parallel.plan import activation_bytes
    from distrain.train.trainer import Trainer

    rows = []
    for mode in ("none", "selective", "full"):
        run_dir = tempfile.mkdtemp(prefix="distrain-bench-act-")
        job = load_job("qwen3_moe_debug", [f"run.dir={run_dir}", "eval.interval=0", "logging.wandb.mode=disabled", "run.device=cuda",
                                           f"parallel.activation_checkpointing={mode}", *MODEL, *args.overrides])
        device = resolve_device(job)
        if not torch.distributed.is_initialized():
            init_distributed(job, device)
        prepare_corpus(job.data)
        write_config_yaml(job, Path(run_dir) / "config.yaml")
        trainer = Trainer(job, device)
        estimate = activation_bytes(job, trainer.dims, trainer.spec, trainer.model.config)
        trainer.train_step(trainer.train_loader.next_batch())
        for param in trainer.model.parameters():  # gradients are state (counted by the plan): allocated before
            param.grad = torch.zeros_like(param)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train_step(trainer.train_loader.next_batch())
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
        bf16_weights = sum(p.numel() for p in trainer.model.parameters()) * 2
        predicted = estimate[mode] + estimate["logits"] + bf16_weights
        rows.append({"mode": mode, "measured_GiB": measured / 2**30, "estimate_GiB": (estimate[mode] + estimate["logits"]) / 2**30,
                     "bf16_weight_copies_GiB": bf16_weights / 2**30, "measured_over_both": measured / predicted})
        del trainer
        torch.cuda.empty_cache()
    report("activation_memory", rows, args.out, {"model": MODEL + args.overrides, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
