"""Injected faults, for the tests that prove distrain survives real ones. Inert unless
`DISTRAIN_FAULT` is set.

    DISTRAIN_FAULT="raise@step:rank=1:step=3"                one rank raises before step 3
    DISTRAIN_FAULT="nan@loss:rank=1:step=4-6"                rank 1's loss is NaN at steps 4 to 6
    DISTRAIN_FAULT="hang@step:rank=1:step=2"                 rank 1 stops answering at step 2
    DISTRAIN_FAULT="sleep@export:seconds=10"                 the export takes 10 s longer
    DISTRAIN_FAULT="kill@save_renamed:step=4"                SIGKILL of the whole job at that moment
    DISTRAIN_FAULT="signal@step:step=5:signal=SIGTERM"       the job's launcher gets SIGTERM

An entry is ACTION@POINT with optional `rank=R` (default: every rank) and `step=S` or `step=A-B`
(default: every step); several entries are separated by `;`. The points are named where
`fire(point, step)` is called: step, loss, export, and the save and resume moments of
`distrain.checkpoint`.
"""

from __future__ import annotations

import os
import signal
import time
from functools import cache


@cache
def _entries() -> list[dict[str, str]]:
    spec = os.environ.get("DISTRAIN_FAULT", "").strip()
    entries = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        head, *options = text.split(":")
        action, _, point = head.partition("@")
        entries.append({"action": action, "point": point, **dict(o.split("=", 1) for o in options)})
    return entries


def _matches(entry: dict[str, str], point: str, step: int | None) -> bool:
    if entry["point"] != point:
        return False
    if "rank" in entry and int(entry["rank"]) != int(os.environ.get("RANK", "0")):
        return False
    if "step" in entry:
        first, _, last = entry["step"].partition("-")
        if step is None or not int(first) <= step <= int(last or first):
            return False
    return True


def active(action: str, point: str, step: int | None = None) -> bool:
    """Whether a fault that the caller carries out itself (e.g. `nan@loss`) applies here."""
    return any(e["action"] == action and _matches(e, point, step) for e in _entries())


def fire(point: str, step: int | None = None) -> None:
    """Carry out the faults that act on their own (raise, hang, sleep, kill, signal) at `point`."""
    for entry in _entries():
        if not _matches(entry, point, step):
            continue
        action, where = entry["action"], f"{point}" + ("" if step is None else f" at step {step}")
        if action == "raise":
            raise RuntimeError(f"injected fault (DISTRAIN_FAULT) on rank {os.environ.get('RANK', '0')}: {where}")
        if action == "hang":
            while True:
                time.sleep(3600)
        if action == "sleep":
            time.sleep(float(entry["seconds"]))
        if action == "kill":
            _kill_job()
        if action == "signal":
            os.kill(int(os.environ.get("DISTRAIN_LAUNCHER_PID", os.getpid())), getattr(signal, entry["signal"]))


def _kill_job() -> None:
    """SIGKILL every process of this job at once, as a node failure would: the launcher, its
    other workers and this process."""
    from distrain.launch.procs import child_pids

    launcher = int(os.environ.get("DISTRAIN_LAUNCHER_PID", os.getpid()))
    # NOTE: the launcher first (its other workers listed before it dies): ranks firing together
    #       would otherwise kill each other first
    victims = [launcher] + [pid for pid in child_pids(launcher) if pid != os.getpid()]  # evaluated before any kill
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)
