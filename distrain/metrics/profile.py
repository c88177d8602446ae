"""`profile.steps=[a,b]`: a torch.profiler trace of training steps a..b, one file per rank.

The trace (Chrome trace format: ui.perfetto.dev or chrome://tracing) shows, per thread and CUDA
stream, every op, kernel and collective of those steps, each step under a `step N` range; FSDP's
all-gathers and reduce-scatters appear as `FSDP::...` ranges and the collectives as `record_param_comms`
/ `nccl:*` / `gloo:*` events, so whether communication overlaps compute can be read off it.
`profile.memory=true` also records allocations in the trace and, on CUDA, the caching allocator's
history (`memory_rank<r>.pickle`, for pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


SUMMARY_MAX_BYTES = 200 * 2**20


class StepProfiler:
    def __init__(self, config, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (config.steps or [0, -1])
        self.memory, self.rank, self.device = config.memory, rank, device
        self.folder = Path(run_dir) / "profile"
        self.profiler = None

    def step(self, step: int):
        """A context around training step `step` (1-based): starts the profiler before the first
        profiled step, writes the files after the last."""
        if not self.first <= step <= self.last:
            return contextlib.nullcontext()
        return self._profiled(step)

    @contextlib.contextmanager
    def _profiled(self, step: int):
        if self.profiler is None:
            self._start()
            self.started = step  # (a run resumed inside the range starts there)
        self.stepped = step
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.last:
            self.close()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.memory and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=self.memory)
        self.profiler.__enter__()

    def close(self) -> list[Path]:
        """Stop and write the files (also for a run that ends inside the profiled steps)."""
        if self.profiler is None:
            return []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        written = [self.folder / f"trace_rank{self.rank}.json"]
        self.profiler.export_chrome_trace(str(written[0]))
        if self.memory and self.device.type == "cuda":
            written.append(self.folder / f"memory_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(str(written[-1]))
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            # NOTE: the other ranks are already in the next step's collectives (bounded by the
            #       collective timeout): the summary reads only traces of a size parsed in seconds
            summary = "; open the trace for what overlaps what"
            if written[0].stat().st_size <= SUMMARY_MAX_BYTES:
                comm, overlapped = comm_overlap(json.loads(written[0].read_text()))
                summary = f"; rank 0: {comm / 1e3:.1f} ms in collectives, {overlapped / max(comm, 1e-9):.0%} of it overlapping compute"
            print(f"profile: steps {self.started}-{self.stepped} traced in {self.folder} ("
                  + ", ".join(p.name.replace("rank0", "rank<r>") for p in written) + ")" + summary, flush=True)
        self.profiler = None
        self.first, self.last = 0, -1
        return written


def comm_overlap(trace: dict) -> tuple[float, float]:
    """(microseconds some collective ran, microseconds of those during which compute ran too),
    from a Chrome trace. Collectives: NCCL kernels on the GPU, gloo's work on its own threads on
    the CPU; compute: the other GPU kernels, or the aten ops of the thread that issued the step."""
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    if kernels:
        comm = [e for e in kernels if "nccl" in e["name"].lower()]
        compute = [e for e in kernels if "nccl" not in e["name"].lower()]
    else:
        main = next((e["tid"] for e in spans if e["name"].startswith("step ")), None)
        comm = [e for e in spans if e["name"].startswith("gloo:") and e["tid"] != main]
        compute = [e for e in spans if e["tid"] == main and e.get("cat") == "cpu_op" and e["name"].startswith("aten::")]
    comm_spans, compute_spans = _union(comm), _union(compute)
    overlapped, j = 0.0, 0
    for start, end in comm_spans:
        while j < len(compute_spans) and compute_spans[j][1] <= start:
            j += 1
        k = j
        while k < len(compute_spans) and compute_spans[k][0] < end:
            overlapped += min(end, compute_spans[k][1]) - max(start, compute_spans[k][0])
            k += 1
    return sum(end - start for start, end in comm_spans), overlapped


def _union(events: list[dict]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]
