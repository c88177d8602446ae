"""Functions the test ranks (tests/ranks.py) run on every rank of a job, each setting up and
tearing down its own process group."""

from __future__ import annotations


def count_step(recipe: str, overrides: list[str]) -> dict:
    """One warm-up step, then one counted step: each collective kind's bus bytes and calls, and
    the calls of the expensive MoE ops (grouped GEMMs, forward and backward)."""
    from conftest import OpCounter
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    from distrain.metrics.comm import CommCounter

    with trainer_in_own_group(recipe, overrides) as trainer:
        trainer.train_step(trainer.train_loader.next_batch())
        comm, ops = CommCounter(), OpCounter()
        with comm, ops:
            trainer.train_step(trainer.train_loader.next_batch())
        return {"bus": dict(comm.bus), "collectives": dict(comm.calls), "grouped_mm": ops.calls["aten._grouped_mm"]}


def import_memory(recipe: str, overrides: list[str]) -> dict:
    """A Trainer built from a pretrained model (the weights imported on every rank): how far the
    rank's resident memory rose above its level before, by the end of the import (its own
    counters: /proc/self/clear_refs resets the peak, VmHWM reads it), with the modeling code
    imported before the baseline."""
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    from distrain.config import load_job
    from distrain.models import build_config, meta_model

    meta_model(build_config(load_job(recipe, overrides).model))

    def status(field: str) -> int:
        return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

    import distrain.train.trainer as trainer_module

    load_sharded, peaks = trainer_module.load_sharded, []

    def measured(model, folder):  # the peak up to the end of the import (the optimizer's state comes after)
        load_sharded(model, folder)
        peaks.append(status("VmHWM"))

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident size starts again from now
    before = status("VmRSS")
    trainer_module.load_sharded = measured
    try:
        with trainer_in_own_group(recipe, overrides) as trainer:
            shard_bytes = sum(p.to_local().numel() * 4 if hasattr(p, "to_local") else p.numel() * 4 for p in trainer.model.parameters())
    finally:
        trainer_module.load_sharded = load_sharded
    return {"grown": peaks[0] - before, "shard_bytes": shard_bytes}
