"""Functions the test ranks (tests/ranks.py) run on every rank of a job, each setting up and
tearing down its own process group."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def count_step(recipe: str, overrides: list[str]) -> dict:
    """One warm-up step, then one counted step: each collective kind's bus bytes and calls, and
    the calls of the expensive MoE ops (grouped GEMMs, forward and backward)."""
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from distrain.config import load_job
    from distrain.launch.worker import init_distributed, resolve_device
    from distrain.metrics.comm import CommCounter
    from distrain.train.trainer import Trainer

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    job = load_job(recipe, ["eval.interval=0", "logging.wandb.mode=disabled", *overrides])
    device = resolve_device(job)
    init_distributed(job, device)
    try:
        Path(job.run.dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(job, device)
        trainer.train_step(trainer.train_loader.next_batch())
        comm, ops = CommCounter(), OpCounter()
        with comm, ops:
            trainer.train_step(trainer.train_loader.next_batch())
        if trainer.metrics is not None:
            trainer.metrics.close()
        return {"bus": dict(comm.bus), "collectives": dict(comm.calls), "grouped_mm": ops.calls["aten._grouped_mm"]}
    finally:
        dist.destroy_process_group()

