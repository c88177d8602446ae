"""Where step records go: the console (a line per step, or a tqdm bar), metrics.jsonl and wandb.

Only rank 0 builds a `MetricsLogger`; other ranks log nothing.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from distrain import faults
from distrain.config.schema import JobConfig


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, job: JobConfig, run_dir: Path, config_dict: dict[str, Any], start_step: int):
        self.job = job
        self.total_steps = job.train.steps
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.bar = None
        if job.logging.console == "progress":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.wandb = _init_wandb(job, run_dir, config_dict, start_step) if job.logging.wandb.mode != "disabled" else None

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        # NaN and inf are not JSON: a non-finite value is written as null (the record says "skipped")
        record = _finite(record)
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if record.get("moe_max_mean_load"):
                scalars["moe_worst_max_mean_load"] = max(record["moe_max_mean_load"])
                scalars["moe_worst_dropped_fraction"] = max(record["moe_dropped_fraction"])
            self.wandb.log(scalars, step=step)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        mfu = record.get("mfu")
        fields = {
            "loss": "n/a" if record["loss"] is None else f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "grad_norm": "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
            "tokens/s": f"{record['tokens_per_s']:.0f}",
            "mfu": "n/a" if mfu is None else f"{100 * mfu:.2f}%",
        }
        if "eval_loss" in record:
            fields["eval_loss"] = f"{record['eval_loss']:.4f}"
        if record.get("moe_max_mean_load"):  # the worst MoE layer's busiest expert against the mean
            fields["load max/mean"] = f"{max(record['moe_max_mean_load']):.2f}"
            if max(record["moe_dropped_fraction"]) > 0:  # moe.capacity_factor: the worst layer's
                fields["dropped"] = f"{100 * max(record['moe_dropped_fraction']):.1f}%"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(fields, refresh=True)
        else:
            line = " | ".join(f"{k} {v}" for k, v in fields.items())
            print(f"step {step}/{self.total_steps} | {line} | eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def rewind_metrics(run_dir: Path, step: int) -> int:
    """Move the records of steps after `step` out of metrics.jsonl (steps a crash lost, which the
    resumed run repeats) to the end of metrics.rewound.jsonl; returns how many. Records are in step
    order (every resume rewinds), so only the file's tail is read: a week of records (GBs, with
    the per-expert counts) is not parsed on every requeue while the other ranks wait. metrics.jsonl
    is cut at a record boundary, never left half-written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        cut = _tail_after(f, step)
        f.seek(max(cut - 1, 0))
        last_kept, dropped = f.read(1 if cut else 0), f.read()
        if not dropped:
            if last_kept not in (b"", b"\n"):
                f.write(b"\n")  # the last record kept lost its line end
            return 0
        dropped += b"" if dropped.endswith(b"\n") else b"\n"  # a line a crash cut short
        with open(run_dir / "metrics.rewound.jsonl", "ab") as out:
            out.write(dropped)
        faults.fire("metrics_rewind")
        f.truncate(cut)
    return dropped.count(b"\n")


def _tail_after(f, step: int, block: int = 1 << 20) -> int:
    """The offset just past the last record of a step <= `step` (0: none), read from the end."""
    pos = size = f.seek(0, os.SEEK_END)
    partial = b""  # the first line of the block read last, which may begin before it
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start) + partial
        lines = chunk.split(b"\n")
        partial = lines.pop(0) if start > 0 else b""
        line_end = start + len(chunk)
        for line in reversed(lines):
            logged = _step_of(line)
            if logged is not None and logged <= step:
                return min(line_end + 1, size)  # past its line end, if it has one
            line_end -= len(line) + 1
        pos = start
    return 0


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def _init_wandb(job: JobConfig, run_dir: Path, config_dict: dict[str, Any], start_step: int):
    import wandb

    # The run id lives in the run directory, so a resumed run continues the same wandb run,
    # rewound to the resumed step: the steps a crash lost are logged again, not twice.
    id_file = run_dir / "wandb_run_id"
    resuming = id_file.exists()
    run_id = id_file.read_text().strip() if resuming else secrets.token_hex(4)
    id_file.write_text(run_id)
    where = {"resume_from": f"{run_id}?_step={start_step}"} if resuming else {"id": run_id, "resume": "allow"}
    return wandb.init(
        project=job.logging.wandb.project,
        entity=job.logging.wandb.entity,
        name=job.run.name,
        mode=job.logging.wandb.mode,
        dir=str(run_dir),
        config=config_dict,
        **where,
    )



def _finite(value):
    """`value` with every non-finite float (also inside lists and dicts) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
