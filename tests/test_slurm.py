"""The shipped batch script on a real 2-node Slurm cluster (two slurmd on this machine, one
cluster for the module): each srun task is one rank running in-process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, check_ok, read_metrics, run_cli

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from local_slurm import local_slurm

    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield {**env, "DISTRAIN": str(Path(sys.executable).parent / "distrain"), "WANDB_SILENT": "true"}
    down = subprocess.run(["sinfo"], env=env, capture_output=True, timeout=60)
    assert down.returncode != 0  # the controller this started is gone


def logs(workdir: Path, job: str) -> str:
    """What the job's ranks wrote: one log per node (the batch script's --output)."""
    return "".join(p.read_text() for p in sorted((workdir / "logs").glob(f"distrain-{job}-*.out")))


def options(workdir: Path) -> list[str]:
    return ["--ntasks-per-node=1", f"--chdir={workdir}"]


def test_sbatch_matches_one_process_and_a_failing_rank_fails_the_job(cluster, tmp_path, tiny):
    from local_slurm import submit, wait_job

    args = [*tiny, "train.steps=3", "eval.interval=0", "checkpoint.export=false"]
    check_ok(run_cli(["train", "recipe=qwen3_moe_debug", *args, f"run.dir={tmp_path / 'reference'}"], tmp_path))
    layout = ["recipe=qwen3_moe_debug", *args, "parallel.tp=2", "parallel.sp=true"]
    job = submit(cluster, SCRIPT, [*layout, f"run.dir={tmp_path / 'slurm-run'}"], nodes=2, sbatch_options=options(tmp_path))
    state, code, output = wait_job(cluster, job, timeout=240)
    assert (state, code) == ("COMPLETED", "0:0"), output + logs(tmp_path, job)
    assert logs(tmp_path, job).count("step 3/3") == 1  # rank 0 alone prints
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "slurm-run")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-5)

    start = time.perf_counter()
    env_fault = {**cluster, "DISTRAIN_FAULT": "raise@step:rank=1:step=2"}
    job = submit(env_fault, SCRIPT, [*layout, f"run.dir={tmp_path / 'failing'}"], nodes=2, sbatch_options=options(tmp_path))
    state, code, output = wait_job(cluster, job, timeout=240)
    assert state == "FAILED" and code != "0:0" and "injected fault" in logs(tmp_path, job), (state, code, output)
    assert time.perf_counter() - start < 120


def test_preempted_job_saves_requeues_and_resumes(cluster, tmp_path, tiny):
    """scancel --signal=USR1 mid-run (what --signal=B:USR1@600 sends before a time limit): the
    ranks save and exit 75, the script requeues the job, and the requeued job (same id, so the
    same default run directory) resumes and finishes like an uninterrupted run."""
    from local_slurm import job_fields, submit, wait_job

    args = ["recipe=qwen3_moe_debug", *tiny, "train.steps=300", "eval.interval=0", "checkpoint.interval=100", "checkpoint.export=false"]
    # the same layout (FSDP over 2 ranks) uninterrupted: 300 steps of another layout would drift apart
    check_ok(run_cli(["train", *args, f"run.dir={tmp_path / 'reference'}", "launcher.nproc_per_node=2"], tmp_path, env={"OMP_NUM_THREADS": "1"}))
    job = submit(cluster, SCRIPT, args, nodes=2, sbatch_options=options(tmp_path))
    run_dir = tmp_path / "runs" / f"qwen3_moe_debug-job{job}"  # no run.dir: named after the job
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, logs(tmp_path, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    deadline = time.monotonic() + 120
    steps_alive = lambda: subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{job}\\."], capture_output=True).returncode == 0  # noqa: E731
    while job_fields(cluster, job).get("Restarts") != "1" or job_fields(cluster, job)["JobState"] != "PENDING" or steps_alive():
        assert time.monotonic() < deadline, job_fields(cluster, job)
        time.sleep(0.5)
    # NOTE: Slurm holds a requeued job for about 2 minutes (BeginTime); release it once its first
    #       run's steps are gone. Released sooner (within the second of the requeue), slurmd
    #       refuses it: "Job credential revoked".
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    state, code, output = wait_job(cluster, job, timeout=300)
    assert (state, code) == ("COMPLETED", "0:0"), output + logs(tmp_path, job)
    rank_logs = logs(tmp_path, job)
    assert "stopped by SIGUSR1" in rank_logs and "requeueing job" in output and "resuming from" in rank_logs
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 301))  # every step exactly once
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-5)


def test_a_hung_rank_ends_the_job_within_the_timeout(cluster, tmp_path, tiny):
    from local_slurm import submit, wait_job

    start = time.perf_counter()
    args = ["recipe=qwen3_moe_debug", *tiny, "train.steps=5", "launcher.timeout_s=10", f"run.dir={tmp_path / 'run'}"]
    job = submit({**cluster, "DISTRAIN_FAULT": "hang@step:rank=1:step=2"}, SCRIPT, args, nodes=2, sbatch_options=options(tmp_path))
    state, code, output = wait_job(cluster, job, timeout=240)
    assert state == "FAILED" and code != "0:0", (state, code, output + logs(tmp_path, job))
    assert time.perf_counter() - start < 90


def test_a_cancelled_job_is_not_requeued(cluster, tmp_path, tiny):
    """scancel (SIGTERM to the ranks and the batch script): the ranks save, and the job ends
    CANCELLED, not requeued."""
    from local_slurm import job_fields, submit, wait_job

    args = ["recipe=qwen3_moe_debug", *tiny, "train.steps=2000", "eval.interval=0", "checkpoint.interval=0", "checkpoint.export=false",
            f"run.dir={tmp_path / 'run'}"]
    job = submit(cluster, SCRIPT, args, nodes=2, sbatch_options=options(tmp_path))
    deadline = time.monotonic() + 120
    while not ((tmp_path / "run" / "metrics.jsonl").exists() and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, logs(tmp_path, job)
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=cluster, check=True)
    state, _, output = wait_job(cluster, job, timeout=120)
    assert state == "CANCELLED" and job_fields(cluster, job).get("Restarts") == "0", (state, output + logs(tmp_path, job))
    assert "stopped by SIGTERM" in logs(tmp_path, job) and list((tmp_path / "run" / "checkpoints").glob("step_*"))
