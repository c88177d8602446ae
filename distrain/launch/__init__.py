"""Process topology: run in this process, or start local ranks with torch's elastic launcher.

- Under `torchrun` (RANK/WORLD_SIZE in the environment), or `srun` with one task per rank (its
  SLURM_* task layout becomes RANK/WORLD_SIZE/LOCAL_RANK), every rank composed the config itself
  and runs in-process.
- With `launcher.nproc_per_node` > 1, this process starts that many workers with
  `torch.distributed.run`, handing them the resolved config in a file. If one rank fails, the
  elastic agent stops the others and this returns non-zero.
- Otherwise the single process runs in-process as a world of one.
"""

from __future__ import annotations

import os
import re

from distrain.config import JobConfig, write_config_yaml


def adopt_slurm_env() -> None:
    """Under `srun` (a job step of several tasks, one per rank), expose Slurm's task layout as the
    variables torch's env:// rendezvous reads. A batch script itself is no step: left alone."""
    env = os.environ
    num_tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "RANK" in env or "SLURM_STEP_ID" not in env or num_tasks <= 1:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], str(num_tasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        import subprocess

        def scontrol(*args: str) -> str:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout

        nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        first = scontrol("show", "hostnames", nodes).split()[0]
        # NOTE: the address Slurm itself reaches the node at; a node name need not resolve
        #       (several slurmd on one host, names missing from DNS)
        fields = dict(f.split("=", 1) for f in scontrol("show", "node", "-o", first).split() if "=" in f)
        env["MASTER_ADDR"] = fields.get("NodeAddr", first)
    # NOTE: one port per job step: steps of one allocation may run at once on the same first node
    step = int(env["SLURM_STEP_ID"]) if env["SLURM_STEP_ID"].isdigit() else 0
    env.setdefault("MASTER_PORT", str(20000 + (int(env.get("SLURM_JOB_ID", "0")) * 31 + step) % 20000))


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def ranks_on_this_node(job: JobConfig) -> int | None:
    """The ranks this node runs: the launcher's (torchrun's LOCAL_WORLD_SIZE; srun's tasks per node
    where its layout is uniform), else `launcher.nproc_per_node`; None where it cannot be told."""
    if not under_launcher():
        return job.launcher.nproc_per_node
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    uniform = re.fullmatch(r"(\d+)(\(x\d+\))?", os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return int(uniform[1]) if uniform else None


def world_size_for(job: JobConfig) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_launcher() else job.launcher.nproc_per_node


def launch(job: JobConfig) -> int:
    """Run `job` on its ranks; returns the exit status (in-process ranks exit with it)."""
    from distrain.launch.worker import run, run_and_exit, watch_parent

    if under_launcher():
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torchrun's elastic agent
            watch_parent()
        run_and_exit(job)
    if job.launcher.nproc_per_node == 1:
        return run(job)
    return _spawn_local(job)


def _spawn_local(job: JobConfig) -> int:
    """`launcher.nproc_per_node` ranks under torch's elastic agent, which runs in a thread of this
    process (so it installs no signal handlers of its own). SIGTERM, SIGINT and SIGUSR1 are
    passed on to the workers, which save and stop (`distrain.train.stop`) and exit with their
    own status, which this returns; a second Ctrl-C kills them. A failing rank makes the agent
    stop the others (SIGTERM, then SIGKILL after `launcher.timeout_s`)."""
    import logging
    import shutil
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as elastic_run

    from distrain.launch.procs import child_pids
    from distrain.train import stop

    # the ranks say what happened; the agent's own log lines would repeat it at length
    quiet = logging.getLogger("torch.distributed.elastic")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    with tempfile.NamedTemporaryFile("w", prefix="distrain-job-", suffix=".yaml", delete=False) as handoff:
        pass
    write_config_yaml(job, handoff.name)
    os.environ["DISTRAIN_LAUNCHER_PID"] = str(os.getpid())  # for the kill@... test faults
    # how long a failing rank's peers get to exit before SIGKILL (an environment variable rather
    # than --shutdown_timeout, which older torch lacks)
    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(job.launcher.timeout_s)
    failures = tempfile.mkdtemp(prefix="distrain-failures-")  # a failing rank writes when it failed (worker._report_failure)
    os.environ["DISTRAIN_FAILURE_DIR"] = failures
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc_per_node={job.launcher.nproc_per_node}",
            "--max_restarts=0",
            "--module",
            "distrain.launch.worker",
            handoff.name,
        ]
    )
    outcome: dict = {}

    def agent() -> None:
        try:
            elastic_run(args)
        except ChildFailedError as error:
            outcome["failure"] = error.get_first_failure()
        except BaseException as error:  # noqa: BLE001 - reported from the main thread
            outcome["error"] = error

    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in stop.SIGNALS}
    thread = threading.Thread(target=agent, name="distrain-elastic-agent", daemon=True)
    thread.start()
    interrupted = killed = False
    try:
        while thread.is_alive():
            thread.join(0.2)
            workers = child_pids(os.getpid())
            while pending and workers:
                signum = pending.pop(0)
                again = signum == signal.SIGINT and interrupted
                interrupted |= signum == signal.SIGINT
                killed |= again
                for pid in workers:
                    try:
                        os.killpg(pid, signal.SIGKILL if again else signum)
                    except ProcessLookupError:
                        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.unlink(handoff.name)
    reported = sorted((float(path.read_text()), int(path.name[4:])) for path in Path(failures).glob("rank*"))
    shutil.rmtree(failures, ignore_errors=True)
    if killed:
        return 128 + signal.SIGINT
    if "error" in outcome:
        raise outcome["error"]
    if "failure" not in outcome:
        return 0
    rank, failure = outcome["failure"]
    if failure.exitcode in (2, *stop.STOP_STATUSES):
        return failure.exitcode  # the rank has said why
    if reported:  # the rank that failed first (its peers then fail on the broken collectives)
        rank = reported[0][1]
    print(f"distrain: rank {rank} failed with exit code {failure.exitcode}; see its output above", flush=True)
    return failure.exitcode if failure.exitcode > 0 else 1
