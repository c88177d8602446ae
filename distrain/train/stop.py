"""Stopping a run on request: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (what `#SBATCH
--signal=B:USR1@...` sends before a time limit or preemption).

The first such signal is only recorded. At the next step boundary the ranks all-reduce what they
received (`Trainer.agree`), so every rank stops after the same step, saves a complete
checkpoint and exits with `exit_status`: 75 after SIGUSR1 (EX_TEMPFAIL: the batch script
requeues the job), 143 after SIGTERM, 130 after SIGINT. Once a SIGINT has come, a second
SIGINT (Ctrl-C pressed again), or the SIGTERM a launcher sends when it gives up waiting, stops
the process at once, without saving. A second SIGTERM alone does not: schedulers deliver one
cancel several times (Slurm signals every process of a step, and a launcher forwards it again).
"""

from __future__ import annotations

import os
import signal

EXIT_NONFINITE = 3  # the run stopped on non-finite values (train.nonfinite)
EXIT_REQUEUE = 75  # stopped by SIGUSR1 after saving: run it again (requeue) to continue

# in order of precedence: a cancel (SIGTERM) outranks a requeue request
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# what ranks exit with after they agreed to stop; rank 0 alone carries it (`distrain.launch.worker`)
STOP_STATUSES = (EXIT_NONFINITE, EXIT_REQUEUE, 128 + signal.SIGINT, 128 + signal.SIGTERM)
_received: list[int] = []


def _handler(signum, frame) -> None:
    if signal.SIGINT in _received and signum != signal.SIGUSR1:
        name = signal.Signals(signum).name
        os.write(2, f"distrain: {name} after SIGINT: stopping at once, without a checkpoint\n".encode())
        os._exit(128 + signal.SIGINT)
    _received.append(signum)


def install(signals=SIGNALS) -> None:
    """Record stop signals instead of dying of them (main thread only, as Python requires)."""
    for sig in signals:
        signal.signal(sig, _handler)


def received() -> list[int]:
    """One flag per entry of SIGNALS: whether this process got it."""
    return [int(sig in _received) for sig in SIGNALS]


def exit_status(flags: list[int]) -> int:
    """The exit status for the signals the ranks agreed on (the first set flag of SIGNALS)."""
    for sig, flag in zip(SIGNALS, flags):
        if flag:
            return EXIT_REQUEUE if sig == signal.SIGUSR1 else 128 + sig
    return 0


def name(flags: list[int]) -> str:
    return next(sig.name for sig, flag in zip(SIGNALS, flags) if flag)
