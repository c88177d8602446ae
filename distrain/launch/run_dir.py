"""The run directory: one live run at a time, prepared once by rank 0.

`check_run` runs before any worker starts (problems exit 2); `prepare_run` runs on rank 0 only,
after the process group exists, and its result is what every rank uses (`worker.agree`):
1. take the directory's lock (`.lock`, an flock held until the process ends, so a killed run
   frees it): a second live run in the same directory is refused, naming the first one's pid;
2. choose the checkpoint to resume (`distrain.checkpoint.resume`), set aside newer ones, and
   clear what interrupted saves, prunes and exports left;
3. rewind `metrics.jsonl` to the resumed step;
4. write the resolved `config.yaml`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from distrain.checkpoint import resume as resumes
from distrain.checkpoint.dcp import clean_leftovers
from distrain.config import ConfigError, JobConfig, write_config_yaml
from distrain.metrics.sinks import rewind_metrics

_held: list[int] = []  # the lock's file descriptor, open for the life of the process


def _lock(run_dir: Path, hold: bool) -> None:
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"run.dir={run_dir} is in use by a live run ({holder}); wait for it to finish or stop it, or pick another run.dir"
        ) from None
    if not hold:
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held.append(fd)


def check_run(job: JobConfig, data_fingerprint: str | None, lock: bool) -> resumes.Resume:
    """Before spawn: the run directory is usable, not in use (when `lock`), and the resume
    allowed. Nothing is written but the directory itself."""
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
    _lock(run_dir, hold=True)
    resume = resumes.choose(job, data_fingerprint)
    lines = [*resume.warnings, *resumes.set_aside(resume)]
    clean_leftovers(run_dir / "checkpoints")
    for leftover in run_dir.glob(".export.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    if resume.path is None:
        lines.append(f"run {run_dir}: starting from scratch")
    else:
        lines.append(f"run {run_dir}: resuming from {resume.path} at step {resume.step}")
        lines += [f"  changed since the checkpoint: {change}" for change in resumes.changed_keys(job, resume.path)]
    dropped = rewind_metrics(run_dir, resume.step)
    if dropped:
        lines.append(f"  metrics.jsonl: dropped {dropped} records after step {resume.step} (the steps a crash lost; they run again)")
    tmp = run_dir / "config.yaml.tmp"
    write_config_yaml(job, tmp)
    os.replace(tmp, run_dir / "config.yaml")
    return resume, lines
