"""Shared fixtures: a tiny model and corpus, and running the CLI the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# no GPU here: distrain's Triton kernels run under the interpreter (set before anything imports triton)
os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402 - after the line above


def tiny_overrides(cache_dir: Path) -> list[str]:
    """Shrink any shipped recipe to seconds on a CPU: small model, small corpus, short sequences."""
    return [
        "++model.config.hidden_size=64",
        "++model.config.intermediate_size=128",
        "++model.config.num_hidden_layers=2",
        "++model.config.num_attention_heads=4",
        "++model.config.num_key_value_heads=2",
        "++model.config.head_dim=16",
        "++model.config.vocab_size=1024",
        "data.vocab_size=1024",
        "data.max_bytes=600000",
        f"data.cache_dir={cache_dir}",
        "train.seq_len=64",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "eval.batches=2",
        "logging.peak_flops=1.0e11",
    ]


MOE_TINY = ["++model.config.moe_intermediate_size=64", "++model.config.num_experts=4", "++model.config.num_experts_per_tok=2"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distrain-cache")


@pytest.fixture(scope="session")
def tiny_dense(data_cache) -> list[str]:
    return tiny_overrides(data_cache)


@pytest.fixture(scope="session")
def tiny(data_cache) -> list[str]:
    return tiny_overrides(data_cache) + MOE_TINY


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in {**os.environ, "WANDB_SILENT": "true", **(env or {})}.items() if k not in unset}
    proc = subprocess.run(
        [sys.executable, "-m", "distrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return proc


def run_cli_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`distrain ARGS` that starts no worker (input refused before spawn, `distrain plan`), run in
    this process: the CLI's own entry (`distrain.cli.main`: composing, checking, the one line,
    the exit status) without the 7 s of a new interpreter importing torch and transformers (tests
    of what the command does as a process, and of anything read at import time, such as
    HF_HUB_OFFLINE, use `run_cli`). Input that gets past every check fails here instead of
    starting workers; signal handlers, environment, working directory and the run-directory lock
    are restored after."""
    import contextlib
    import io
    import signal
    from unittest import mock

    import distrain.cli as cli
    import distrain.launch
    from distrain.launch.run_dir import release

    def no_workers(job):
        raise AssertionError(f"distrain {' '.join(args)} passed every check and was about to start workers")

    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    status, here = 0, os.getcwd()
    with mock.patch.dict(os.environ), mock.patch.object(distrain.launch, "launch", no_workers), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.chdir(cwd)
        try:
            cli.main(args)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os.chdir(here)
            release()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return subprocess.CompletedProcess(["distrain", *args], status, out.getvalue(), err.getvalue())


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def ranks(tmp_path_factory):
    """Gloo ranks started once for the test session, at the first test that asks for them (see
    tests/ranks.py): a start imports torch and transformers in 4 processes, about 15 s on 2 cores.
    Between jobs they wait on a socket (no CPU); each holds its imports in memory."""
    from ranks import Ranks

    started = Ranks(tmp_path_factory.mktemp("ranks"))
    yield started
    started.stop()


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name (e.g. "aten._grouped_mm", "distrain.grouped_mm")."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
