"""Long runs that survive: each test injects a real fault (a kill, a signal, a NaN, a corrupt
file, a slow export, ranks started apart) and checks what a user relies on. What involves the
launcher (signals, a killed launcher, rendezvous, timeouts) goes through the CLI; what happens in
the workers runs as jobs of `distrain train` in the test ranks (tests/ranks.py), composed and
validated as the CLI does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import check_ok, read_metrics, run_cli, run_cli_here

MULTI = {"OMP_NUM_THREADS": "1"}
QUIET = ["checkpoint.export=false", "eval.interval=0"]


def train_args(tiny: list[str], run_dir: Path, *extra: str) -> list[str]:
    return ["train", "recipe=qwen3_moe_debug", *tiny, f"run.dir={run_dir}", *extra]


def train_here(ranks, tiny: list[str], run_dir: Path, *extra: str, env: dict | None = None) -> tuple[int, list[str]]:
    """`distrain train` of the run in the test ranks (distrain's rank entry in ranks started once,
    tests/ranks.py): rank 0's exit status (the run's) and what each rank printed."""
    statuses = ranks.run(train_args(tiny, run_dir, *extra)[1:], env)
    return statuses[0], ranks.job_logs(len(statuses))


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))  # not .trash


def read_checkpoint(path: Path, tmp_path: Path) -> dict:
    """A whole DCP checkpoint (model and optimizer) as one flat dict: tensors and the optimizer's
    hyperparameters."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(state, "")
    return flat


def assert_same_losses(expected: list[dict], got: list[dict], steps: range) -> None:
    assert [r["step"] for r in got] == list(steps), [r["step"] for r in got]  # every step exactly once
    by_step = {r["step"]: r for r in expected}
    for record in got:
        assert abs(record["loss"] - by_step[record["step"]]["loss"]) <= 1e-5, (record["step"], record["loss"], by_step[record["step"]]["loss"])


def one_line(stream: str) -> str:
    lines = [line for line in stream.strip().splitlines() if "Writing model shards" not in line]
    assert len(lines) == 1 and "Traceback" not in stream, stream
    return lines[0]


def children(pid: int) -> list[int]:
    from distrain.launch.procs import child_pids

    return child_pids(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {count} steps logged in {timeout} s")


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`distrain` in a session of its own, as a terminal would run it: signals go to it alone."""
    return subprocess.Popen([sys.executable, "-m", "distrain", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "WANDB_SILENT": "true", **MULTI, **(env or {})})


# --------------------------------------------------------------------------- ranks agree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process_ranks(args: list[str], cwd: Path, extra_env: dict, apart: float = 1.5) -> list[subprocess.CompletedProcess]:
    """Two ranks as torchrun or srun start them: each composes its own config, `apart` s apart."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, **MULTI, "WANDB_SILENT": "true", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra_env}
        procs.append(subprocess.Popen([sys.executable, "-m", "distrain", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(apart)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_ranks_that_reach_the_rendezvous_apart_wait_for_each_other(tmp_path, tiny):
    """srun tasks prepare the run each on their own (weights downloaded, token store built or waited
    for) and meet minutes apart: the rendezvous waits for the last, whatever launcher.timeout_s,
    which bounds the collectives after it."""
    args = ["train", "recipe=qwen3_moe_debug", *tiny, *QUIET, "checkpoint.interval=0", "train.steps=1", "launcher.timeout_s=2",
            f"run.dir={tmp_path / 'run'}"]
    for proc in _in_process_ranks(args, tmp_path, {}, apart=10):
        check_ok(proc)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


@pytest.mark.slow
def test_ranks_started_apart_agree_on_the_run_directory(tmp_path, tiny):
    args = ["train", "recipe=qwen3_moe_debug", *tiny, *QUIET, "checkpoint.interval=0"]
    # no run.dir: each rank's default names the time it composed its config, 1.5 s apart
    for proc in _in_process_ranks([*args, "train.steps=2"], tmp_path, {}):
        check_ok(proc)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert checkpoints(run_dir) == ["step_00000002"] and (run_dir / "checkpoints" / "step_00000002" / ".metadata").exists()
    first = read_metrics(run_dir)
    assert [r["step"] for r in first] == [1, 2]

    # torchrun --rdzv-id (or a Slurm job id) names the directory: a second launch resumes it, together
    shared = {"TORCHELASTIC_RUN_ID": "job42"}
    for proc in _in_process_ranks([*args, "train.steps=2"], tmp_path, shared):
        check_ok(proc)
    resumed = _in_process_ranks([*args, "train.steps=4"], tmp_path, shared)
    for proc in resumed:
        check_ok(proc)
    assert "resuming from" in resumed[0].stdout and "at step 2" in resumed[0].stdout
    run_dir = tmp_path / "runs" / "qwen3_moe_debug-job42"
    assert len(list((tmp_path / "runs").iterdir())) == 2 and checkpoints(run_dir) == ["step_00000002", "step_00000004"]
    records = read_metrics(run_dir)
    assert_same_losses(first, records[:2], range(1, 3))
    assert [r["step"] for r in records] == [1, 2, 3, 4]


@pytest.mark.slow
def test_an_export_longer_than_the_collective_timeout_ends_in_success(tmp_path, tiny):
    run_dir = tmp_path / "run"
    proc = run_cli([*train_args(tiny, run_dir, "train.steps=2", "eval.interval=0", "launcher.nproc_per_node=2", "launcher.timeout_s=5")],
                   tmp_path, env={**MULTI, "DISTRAIN_FAULT": "sleep@export:seconds=10"})
    check_ok(proc)
    assert "exported step_00000002" in proc.stdout and (run_dir / "export" / "model.safetensors").exists()


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_by_every_rank(tmp_path, tiny, ranks):
    common = [*QUIET, "train.steps=6", "checkpoint.interval=1", "checkpoint.keep=0", "launcher.nproc_per_node=2"]
    run_dir = tmp_path / "run"
    status, logs = train_here(ranks, tiny, run_dir, *common, env={"DISTRAIN_FAULT": "nan@loss:rank=1:step=4"})
    assert status == 0 and "step 4: " in logs[0] and "skipped" in logs[0], logs[0]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[3]["skipped"] and records[3]["loss"] is None and records[3]["grad_norm"] is None  # valid JSON
    assert not any(r.get("skipped") for r in records[:3] + records[4:])

    # the skipped step changed no weight and no optimizer state (the lr follows the step); it
    # consumed its batch
    before, after = (read_checkpoint(run_dir / "checkpoints" / f"step_0000000{s}", tmp_path) for s in (3, 4))
    assert before.keys() == after.keys() and any(k.startswith("optim.state.") for k in before)
    for key in (k for k in before if not k.endswith(".lr")):
        assert torch.equal(before[key], after[key]) if torch.is_tensor(before[key]) else before[key] == after[key], key
    position = lambda s: json.loads((run_dir / "checkpoints" / f"step_0000000{s}" / "train_state.json").read_text())["data"]["position"]  # noqa: E731
    assert position(4) == position(3) + 4

    # the same as a run that never saw step 4's update: step 3's state, with step 4's batch consumed
    reference = tmp_path / "reference"
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", reference / "checkpoints" / "step_00000004")
    state_file = reference / "checkpoints" / "step_00000004" / "train_state.json"
    state = json.loads(state_file.read_text())
    state["step"], state["data"]["position"] = 4, state["data"]["position"] + 4
    state_file.write_text(json.dumps(state))
    ranks.train(train_args(tiny, reference, *common)[1:])
    assert_same_losses(records, read_metrics(reference), range(5, 7))
    final, expected = (read_checkpoint(d / "checkpoints" / "step_00000006", tmp_path) for d in (run_dir, reference))
    for key in expected:
        if torch.is_tensor(expected[key]):
            torch.testing.assert_close(final[key], expected[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_nonfinite_values_stop_the_run_with_a_finite_checkpoint(tmp_path, tiny, ranks):
    common = [*QUIET, "train.steps=6", "checkpoint.interval=1", "checkpoint.keep=1"]
    # train.nonfinite=stop: the first non-finite step ends the run; step 3, the last good one, survives
    status, logs = train_here(ranks, tiny, tmp_path / "stop", *common, "train.nonfinite=stop", "launcher.nproc_per_node=2",
                              env={"DISTRAIN_FAULT": "nan@loss:rank=1:step=4"})
    assert status == 3 and "non-finite" in logs[0] and not any("Traceback" in log for log in logs), logs
    assert checkpoints(tmp_path / "stop") == ["step_00000003"]

    # skip, up to train.max_nonfinite_steps in a row
    status, logs = train_here(ranks, tiny, tmp_path / "streak", *common, "train.max_nonfinite_steps=2", env={"DISTRAIN_FAULT": "nan@loss:step=2-6"})
    assert status == 3 and "train.max_nonfinite_steps=2" in logs[0], logs
    assert [r["step"] for r in read_metrics(tmp_path / "streak") if r.get("skipped")] == [2, 3, 4]
    # metrics.jsonl stays strict JSON (NaN is not JSON): the non-finite values are null

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")

    records = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "streak" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if r.get("skipped")] == [None, None, None]

    # a weight gone non-finite (as an overflowing update leaves it) is never checkpointed
    status, logs = train_here(ranks, tiny, tmp_path / "poisoned", *common, env={"DISTRAIN_FAULT": "nan@weights:step=3"})
    assert status == 3 and "no checkpoint written" in logs[0], logs
    assert checkpoints(tmp_path / "poisoned") == ["step_00000002"]
    state = read_checkpoint(tmp_path / "poisoned" / "checkpoints" / "step_00000002", tmp_path)
    assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))


# --------------------------------------------------------------------------- honest resume


def test_a_resume_that_changes_the_data_stream_is_refused(tmp_path, tiny, ranks):
    run_dir = tmp_path / "run"
    ranks.train(train_args(tiny, run_dir, *QUIET, "train.steps=2")[1:])
    config = (run_dir / "config.yaml").read_text()
    for override, key in (("run.seed=1", "run.seed"), ("train.seq_len=32", "train.seq_len"), ("checkpoint.resume=never", "checkpoint.resume=never")):
        proc = run_cli_here(train_args(tiny, run_dir, *QUIET, "train.steps=3", override), tmp_path)
        assert proc.returncode == 2 and key in one_line(proc.stderr), proc.stderr
        assert "run.dir" in proc.stderr  # how to start fresh
    assert (run_dir / "config.yaml").read_text() == config and checkpoints(run_dir) == ["step_00000002"]

    # other keys may change: the config wins over the checkpoint's optimizer hyperparameters
    status, (out,) = train_here(ranks, tiny, run_dir, *QUIET, "train.steps=3", "optim.weight_decay=0.05", "optim.eps=1e-6")
    assert status == 0 and "optim.weight_decay: 0.1 -> 0.05" in out and "optim.eps: 1e-08 -> 1e-06" in out, out
    state = read_checkpoint(run_dir / "checkpoints" / "step_00000003", tmp_path)
    # (1-D parameters, here the norms, keep their weight decay of 0)
    decays = {k: v for k, v in state.items() if k.endswith(".weight_decay")}
    assert decays and all(v == (0.0 if "norm" in k else 0.05) for k, v in decays.items()), decays
    assert {v for k, v in state.items() if k.endswith(".eps")} == {1e-6}

    # resume=PATH starts a new run from another run's checkpoint; rerunning the same command
    # (a requeue does) continues the new run's own checkpoints, not the path again
    fork = tmp_path / "fork"
    from_path = [*QUIET, "optim.weight_decay=0.05", "optim.eps=1e-6", f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000002'}"]
    status, (out,) = train_here(ranks, tiny, fork, *from_path, "train.steps=4")
    assert status == 0 and "resuming from" in out and "step_00000002 at step 2" in out, out
    status, (out,) = train_here(ranks, tiny, fork, *from_path, "train.steps=5")
    assert status == 0 and "is ignored" in out and f"resuming from {fork}/checkpoints/step_00000004 at step 4" in out, out
    assert [r["step"] for r in read_metrics(fork)] == [3, 4, 5]
    # checkpoint.resume=true / false are auto / never
    proc = run_cli_here(train_args(tiny, fork, *QUIET, "train.steps=5", "checkpoint.resume=false"), tmp_path)
    assert proc.returncode == 2 and "checkpoint.resume=never" in proc.stderr


def test_a_model_vocabulary_smaller_than_the_tokenizer_exits_2_before_spawn(tmp_path, tiny):
    proc = run_cli_here(train_args(tiny, tmp_path / "run", "++model.config.vocab_size=512", "launcher.nproc_per_node=2"), tmp_path)
    assert proc.returncode == 2 and "model.config.vocab_size=512" in one_line(proc.stderr), proc.stderr
    assert not (tmp_path / "run").exists() and not proc.stdout  # no worker started, nothing written


@pytest.mark.slow
def test_corrupt_checkpoints_are_named_or_skipped(tmp_path, tiny, ranks):
    common = [*QUIET, "train.steps=4", "checkpoint.interval=2", "checkpoint.keep=0"]
    full = tmp_path / "full"
    ranks.train(train_args(tiny, full, *common)[1:])
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    shard = max((run_dir / "checkpoints" / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (run_dir / "checkpoints" / "step_00000002" / ".metadata").rename(run_dir / "checkpoints" / "step_00000002" / "metadata.bak")

    # a new run from a broken checkpoint (resume=PATH) names it and exits 2
    for name, problem in (("step_00000004", "truncated"), ("step_00000002", ".metadata is missing")):
        proc = run_cli_here(train_args(tiny, tmp_path / "new", *common, f"checkpoint.resume={run_dir / 'checkpoints' / name}"), tmp_path)
        assert proc.returncode == 2 and name in proc.stderr and problem in one_line(proc.stderr), proc.stderr

    # auto: warns and falls back to the one before, setting the broken one aside (not deleting it)
    (run_dir / "checkpoints" / "step_00000002" / "metadata.bak").rename(run_dir / "checkpoints" / "step_00000002" / ".metadata")
    status, (out,) = train_here(ranks, tiny, run_dir, *common)
    assert status == 0 and "step_00000004 is unusable" in out and "truncated" in out and "resuming from" in out, out
    assert checkpoints(run_dir) == ["step_00000002", "step_00000004", "step_00000004.corrupt"]
    assert_same_losses(read_metrics(full), read_metrics(run_dir), range(1, 5))

    # contents damaged at full length: the load fails on every rank together, and auto falls back
    damaged = tmp_path / "damaged"
    shutil.copytree(full, damaged)
    shard = max((damaged / "checkpoints" / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(os.urandom(shard.stat().st_size))
    status, logs = train_here(ranks, tiny, damaged, *common, "launcher.nproc_per_node=2")
    assert status == 0 and "could not be loaded" in logs[0] and "set aside as step_00000004.corrupt" in logs[0], logs[0]
    assert checkpoints(damaged) == ["step_00000002", "step_00000004", "step_00000004.corrupt"]
    assert_same_losses(read_metrics(full), read_metrics(damaged), range(1, 5))
    # as the start of a new run, it is an error naming it
    proc = run_cli(train_args(tiny, tmp_path / "new2", *common, f"checkpoint.resume={damaged / 'checkpoints' / 'step_00000004.corrupt'}"), tmp_path)
    assert proc.returncode == 1 and "step_00000004.corrupt could not be loaded" in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]


# --------------------------------------------------------------------------- export keeps files


def test_export_never_replaces_what_is_not_an_export(tmp_path, tiny, ranks):
    run_dir = tmp_path / "run"
    ranks.train(train_args(tiny, run_dir, *QUIET, "train.steps=1")[1:])
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    (tmp_path / "a_file").write_text("keep me")
    for target, words in ((str(run_dir), "not empty"), (".", "not empty"), ("a_file", "is a file")):
        proc = run_cli_here(["export", str(checkpoint), target], tmp_path)
        assert proc.returncode == 2 and words in one_line(proc.stderr), proc.stderr
    proc = run_cli_here(["export", str(run_dir), str(tmp_path / "out")], tmp_path)  # not a checkpoint
    assert proc.returncode == 2 and "not a complete distrain checkpoint" in one_line(proc.stderr), proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != "a_file") == before
    assert (tmp_path / "a_file").read_text() == "keep me"

    out = tmp_path / "out"
    check_ok(run_cli_here(["export", str(checkpoint), str(out)], tmp_path))
    again = run_cli_here(["export", str(checkpoint), str(out)], tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    failed = run_cli(["export", str(checkpoint), str(out), "--force"], tmp_path, env={"DISTRAIN_FAULT": "raise@export"})
    assert failed.returncode == 1 and (out / "model.safetensors").exists()  # the previous export is intact
    check_ok(run_cli_here(["export", str(checkpoint), str(out), "--force"], tmp_path))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


# --------------------------------------------------------------------------- kills and signals


@pytest.mark.slow
def test_a_killed_launcher_takes_its_workers_and_frees_the_run_directory(tmp_path, tiny, ranks):
    run_dir = tmp_path / "run"
    args = train_args(tiny, run_dir, *QUIET, "train.steps=2000", "checkpoint.interval=5", "launcher.nproc_per_node=2")
    first = start(args, tmp_path)
    wait_for_steps(run_dir, 6, first)
    # a second live run in the same directory is refused, naming the first
    workers = children(first.pid)
    second = run_cli_here(train_args(tiny, run_dir, *QUIET, "train.steps=3"), tmp_path)
    assert second.returncode == 2 and "in use by a live run" in one_line(second.stderr), second.stderr
    assert any(f"pid {pid} " in second.stderr for pid in workers), (workers, second.stderr)

    os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the launcher's process group (a closed terminal)
    first.communicate()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) == 2 and not any(alive(pid) for pid in workers), "orphaned workers outlived their launcher by 10 s"

    from distrain.checkpoint.dcp import checkpoint_step, latest_checkpoint

    last = checkpoint_step(latest_checkpoint(run_dir / "checkpoints"))  # an interrupted save may have left a .tmp
    # the directory is free again (checked as the CLI checks it), and the run resumes (in the test ranks)
    status, logs = train_here(ranks, tiny, run_dir, *QUIET, f"train.steps={last + 2}", "launcher.nproc_per_node=2")
    assert status == 0 and f"at step {last}" in logs[0], logs[0]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, last + 3))


# Ten moments of a save and three others, each the last moment of one run: every next run must
# resume from a complete checkpoint and continue the uninterrupted run exactly. RANK_LAST is the
# last rank of the layout. keep=2, a save every 2 steps, 12 steps.
KILLS = [
    ("kill@save_begin:step=2", []),  # checkpoint folder made, nothing written
    ("kill@save_written:step=2:rank=0", []),  # rank 0's shards written, the others' maybe not
    ("kill@save_written:step=2:rank=RANK_LAST", []),  # the last rank's shards written
    ("kill@save_before_rename:step=2", []),  # every file written, not yet renamed
    ("kill@save_renamed:step=4", []),  # renamed, the older one not yet pruned
    ("kill@prune:step=6", []),  # an old checkpoint thrown out, not yet deleted
    ("kill@step:step=8:rank=0", []),  # between checkpoints: step 7 logged (by rank 0), not saved
    ("kill@metrics_rewind", []),  # moving step 7's record out of metrics.jsonl on resume
    ("kill@async_staged:step=8", ["checkpoint.async=true"]),  # a background save in flight
    ("kill@async_written:step=8", ["checkpoint.async=true"]),  # written in the background, not published
    ("kill@prune:step=8", ["checkpoint.async=true"]),  # published in the background, pruning
    ("kill@save_renamed:step=12", []),  # the last checkpoint renamed, not yet exported
    ("kill@export", []),  # the final export half written (resumed at the last step: nothing to train)
]


@pytest.mark.slow
def test_kill_9_at_any_moment_of_a_save_resumes_exactly(tmp_path, tiny, ranks):
    """On 2 ranks (one rank runs the same save, less the collectives and the other rank's shards),
    in the test ranks: a rank's process that dies of SIGKILL takes the other's with it, as the
    fault kills a job of the CLI (launcher and workers; the CLI's part is
    `test_a_killed_launcher_takes_its_workers_and_frees_the_run_directory`)."""
    from distrain.checkpoint.dcp import check_complete

    world = 2
    common = ["eval.interval=0", "train.steps=12", "checkpoint.interval=2", "checkpoint.keep=2", f"launcher.nproc_per_node={world}"]
    ranks.train(train_args(tiny, tmp_path / "reference", *common)[1:])
    run_dir = tmp_path / "run"
    for fault, extra in KILLS:
        fault = fault.replace("RANK_LAST", str(world - 1))
        results = ranks.run(train_args(tiny, run_dir, *common, *extra)[1:], env={"DISTRAIN_FAULT": fault}, killed=True)
        assert any(value == f"died: rank {rank} killed by SIGKILL" for rank, (_, value) in enumerate(results)), (fault, results)
        for name in checkpoints(run_dir):
            if name.startswith("step_") and name[5:].isdigit():
                assert check_complete(run_dir / "checkpoints" / name) is None, (fault, name)
    ranks.train(train_args(tiny, run_dir, *common)[1:])
    assert_same_losses(read_metrics(tmp_path / "reference"), read_metrics(run_dir), range(1, 13))
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012"]
    assert not list((run_dir / "checkpoints" / ".trash").iterdir())  # everything thrown out is gone
    assert (run_dir / "export" / "model.safetensors").exists() and not list(run_dir.glob(".export*"))


@pytest.mark.slow
def test_signals_save_a_checkpoint_and_stop(tmp_path, tiny, ranks):
    common = [*QUIET, "train.steps=400", "checkpoint.interval=0"]
    # Ctrl-C of a 1-rank run, SIGTERM of a 2-rank one: one line saying where the checkpoint is
    for sig, world, status in ((signal.SIGINT, 1, 130), (signal.SIGTERM, 2, 143)):
        run_dir = tmp_path / f"{sig.name}"
        proc = start(train_args(tiny, run_dir, *common, f"launcher.nproc_per_node={world}"), tmp_path)
        wait_for_steps(run_dir, 3, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == status, (proc.returncode, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
        stopped = int(checkpoints(run_dir)[-1].split("_")[1])
        assert f"stopped by {sig.name} after step {stopped}; checkpoint {run_dir}/checkpoints/step_{stopped:08d}" in out, out
        assert read_metrics(run_dir)[-1]["step"] == stopped
        # it resumes where it stopped (the resume alone: in the test ranks)
        ranks.train(train_args(tiny, run_dir, *QUIET, f"train.steps={stopped + 2}", f"launcher.nproc_per_node={world}")[1:])
        assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 3))

    # SIGUSR1 (Slurm's warning before a time limit): save, then exit 75 for the batch script to requeue
    usr1 = run_cli(train_args(tiny, tmp_path / "usr1", *common), tmp_path, env={"DISTRAIN_FAULT": "signal@step:step=3:signal=SIGUSR1"})
    assert usr1.returncode == 75 and "stopped by SIGUSR1 after step 3" in usr1.stdout, usr1
    assert checkpoints(tmp_path / "usr1") == ["step_00000003"]

    # SIGUSR1 to the launcher of 2 ranks: passed on, rank 0 says it once, the launcher exits 75
    usr1 = run_cli(train_args(tiny, tmp_path / "usr1x2", *common, "launcher.nproc_per_node=2"), tmp_path,
                   env={**MULTI, "DISTRAIN_FAULT": "signal@step:rank=0:step=3:signal=SIGUSR1"})
    assert usr1.returncode == 75 and usr1.stdout.count("stopped by SIGUSR1 after step") == 1, usr1
    stopped = int(usr1.stdout.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert checkpoints(tmp_path / "usr1x2") == [f"step_{stopped:08d}"]

    # a second Ctrl-C stops at once, workers included, even while they save (here: for 60 s)
    run_dir = tmp_path / "twice"
    proc = start(train_args(tiny, run_dir, *common, "launcher.nproc_per_node=2"), tmp_path, env={"DISTRAIN_FAULT": "sleep@save_begin:seconds=60"})
    wait_for_steps(run_dir, 3, proc)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while not (run_dir / "checkpoints").is_dir() or not list((run_dir / "checkpoints").glob("*.tmp")):  # saving now
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    second = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - second < 5, (proc.returncode, time.monotonic() - second)
    time.sleep(1)
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)
