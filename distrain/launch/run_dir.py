"""The run directory: one live run at a time, prepared once by rank 0.

`check_run` runs before any worker starts (problems exit 2); `prepare_run` runs on rank 0 only,
after the process group exists, and its result is what every rank uses (`worker.agree`):
1. take the directory's lock (`.lock`, an flock held until the process ends, so a killed run
   frees it): a second live run in the same directory is refused, naming the first one's pid;
2. choose the checkpoint to resume (`distrain.checkpoint.resume`), set aside broken ones, and
   throw out what interrupted saves and exports left;
3. rewind `metrics.jsonl` to the resumed step (the records it drops go to `metrics.rewound.jsonl`);
4. write the resolved `config.yaml`.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from distrain.checkpoint import resume as resumes
from distrain.checkpoint.dcp import clean_leftovers, discard
from distrain.config import ConfigError, JobConfig, write_config_yaml
from distrain.metrics.sinks import rewind_metrics

_held: list[int] = []  # the lock's file descriptor, open for the life of the process


def _lock(run_dir: Path, hold: bool) -> str | None:
    """Take the run directory's lock (and keep it, with `hold`); a warning line where the
    filesystem has no locks."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"run.dir={run_dir} is in use by a live run ({holder}); wait for it to finish or stop it, or pick another run.dir"
        ) from None
    except OSError as error:  # ENOLCK and kin: a filesystem without flock
        os.close(fd)
        return f"warning: run.dir={run_dir} cannot be locked ({error.strerror}): a second run in it would not be refused"
    if not hold:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held.append(fd)
    return None


def release() -> None:
    """Give up the locks this process holds (a process that runs several jobs, as the test
    ranks do; a run's own process holds its lock until it exits)."""
    while _held:
        os.close(_held.pop())


def check_run(job: JobConfig, data_fingerprint: str | None, lock: bool) -> resumes.Resume:
    """Before spawn: the run directory is usable, not in use (when `lock`), and the resume
    allowed. Nothing is written but the directory and its lock file."""
    run_dir = Path(job.run.dir)
    if not job.run.dir.strip():
        raise ConfigError("run.dir is empty: name the folder the run writes to, e.g. run.dir=runs/try1")
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"run.dir={run_dir}: {parent} is a file, not a folder; pick another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run.dir={run_dir}: cannot create it ({error.strerror}); pick a folder you can write to") from None
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run.dir={run_dir}: not writable; pick a folder you can write to")
    if lock:
        _lock(run_dir, hold=False)
    return resumes.choose(job, data_fingerprint)


def prepare_run(job: JobConfig, data_fingerprint: str | None) -> tuple[resumes.Resume, list[str]]:
    """Rank 0: lock the run directory, decide the resume and make the directory match it.
    Returns the decision and the lines to print."""
    run_dir = Path(job.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    warning = _lock(run_dir, hold=True)
    resume = resumes.choose(job, data_fingerprint)
    lines = [*([warning] if warning else []), *resume.warnings, *resumes.set_aside(resume)]
    # NOTE: thrown out by renames (instant: the other ranks wait in a collective meanwhile) and
    #       removed in the background
    clean_leftovers(run_dir / "checkpoints")
    for leftover in [*run_dir.glob(".export.*.tmp"), *run_dir.glob(".export.old")]:
        discard(leftover, run_dir / "checkpoints")
    if resume.path is None:
        lines.append(f"run {run_dir}: starting from scratch")
    else:
        lines.append(f"run {run_dir}: resuming from {resume.path} at step {resume.step}")
        lines += [f"  changed since the checkpoint: {change}" for change in resumes.changed_keys(job, resume.path)]
    dropped = rewind_metrics(run_dir, resume.step)
    if dropped:
        lines.append(f"  metrics.jsonl: {dropped} records after step {resume.step} moved to metrics.rewound.jsonl (those steps run again)")
    tmp = run_dir / "config.yaml.tmp"
    write_config_yaml(job, tmp)
    os.replace(tmp, run_dir / "config.yaml")
    return resume, lines
