"""Process topology: run in this process, or start local ranks with torch's elastic launcher.

- Under `torchrun` (RANK/WORLD_SIZE in the environment), or `srun` with one task per rank (its
  SLURM_* task layout becomes RANK/WORLD_SIZE/LOCAL_RANK), every rank composed the config itself
  and runs in-process.
- With `launcher.nproc_per_node` > 1, this process writes the resolved `config.yaml` and starts
  that many workers with `torch.distributed.run`; each reads the file and runs. If one rank fails,
  the elastic agent stops the others and this returns non-zero.
- Otherwise the single process runs in-process as a world of one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_for(job: JobConfig) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_launcher() else job.launcher.nproc_per_node


def launch(job: JobConfig) -> int:
    from distrain.launch.worker import run

    config_path = Path(job.run.dir) / "config.yaml"
    if under_launcher():
        if int(os.environ["RANK"]) == 0:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            write_config_yaml(job, config_path)
        status = run(job)
        # NOTE: as in the spawned workers: gloo sometimes aborts in its destructors at exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_config_yaml(job, config_path)
    if job.launcher.nproc_per_node == 1:
        return run(job)
    return _spawn_local(job, config_path)


def _spawn_local(job: JobConfig, config_path: Path) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as elastic_run

    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc_per_node={job.launcher.nproc_per_node}",
            "--max_restarts=0",
            "--module",
            "distrain.launch.worker",
            str(config_path),
        ]
    )
    try:
        elastic_run(args)
    except ChildFailedError as error:
        first = next(iter(error.failures.values()))
        print(f"distrain: rank {first.local_rank} failed with exit code {first.exitcode}; see the log above", flush=True)
        return first.exitcode if first.exitcode > 0 else 1
    return 0
