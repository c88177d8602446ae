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
