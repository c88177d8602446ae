"""A real Slurm cluster of several nodes on this one machine, for tests (root, Debian).

Debian's Slurm is built to run several `slurmd` on one host: each node is `slurmd -N nI` on
127.0.0.1 with a port of its own. The packages are installed with apt-get when missing (daemons
kept from starting by a policy-rc.d), munge is started if it is not running, and every daemon
this starts is stopped by its pid file on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _run(*args: str, **kwargs) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


def _install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:  # keep the packages' postinst from starting daemons
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        _run("apt-get", "update", "-qq")
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    finally:
        if made:
            policy.unlink()


def _munge_running() -> bool:
    probe = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
    return probe.returncode == 0


def _start_munge() -> bool:
    """Start munged unless one answers; True when this started it."""
    if _munge_running():
        return False
    if not Path("/etc/munge/munge.key").exists() or Path("/etc/munge/munge.key").stat().st_size == 0:
        _run("runuser", "-u", "munge", "--", "mungekey", "--create")
    _run("install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge")
    _run("install", "-d", "-o", "munge", "-g", "munge", "-m", "0700", "/var/lib/munge", "/var/log/munge")
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    for _ in range(50):
        if _munge_running():
            return True
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


def _config(state: Path, nodes: int) -> str:
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=distrain-tests", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", "MpiDefault=none", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
        "SlurmctldPort=16817", f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/d-%n",
        f"SlurmctldPidFile={state}/slurmctld.pid", f"SlurmdPidFile={state}/slurmd-%n.pid",
        f"SlurmctldLogFile={state}/slurmctld.log", f"SlurmdLogFile={state}/slurmd-%n.log",
        "KillWait=5", "MinJobAge=600", "SlurmdTimeout=60", "MailProg=/bin/true",
    ]
    cpus = os.cpu_count() or 1
    for i in range(1, nodes + 1):
        lines.append(f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={17000 + i} CPUs={cpus} RealMemory=1000 State=UNKNOWN")
    lines.append("PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(lines) + "\n"


def _stop(pid_files: list[Path]) -> None:
    pids = []
    for pid_file in pid_files:
        with contextlib.suppress(FileNotFoundError, ValueError):
            pids.append(int(pid_file.read_text().strip()))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


@contextlib.contextmanager
def local_slurm(state: Path, nodes: int = 2):
    """Yield the environment (SLURM_CONF) under which Slurm commands reach a fresh cluster of
    `nodes` idle nodes; stop everything this started on exit."""
    if os.geteuid() != 0:
        raise RuntimeError("the local Slurm cluster needs root (slurmd runs jobs as root here)")
    _install()
    state.mkdir(parents=True, exist_ok=True)
    (state / "ctld").mkdir(exist_ok=True)
    conf = state / "slurm.conf"
    conf.write_text(_config(state, nodes))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started_munge = _start_munge()
    pid_files = [state / "slurmctld.pid", *(state / f"slurmd-n{i}.pid" for i in range(1, nodes + 1))]
    try:
        _run("slurmctld", env=env)
        for i in range(1, nodes + 1):
            _run("slurmd", "-N", f"n{i}", env=env)
        for _ in range(120):
            idle = _run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", env=env).split()
            if len(idle) == nodes:
                break
            time.sleep(0.5)
        else:
            logs = "\n".join(p.read_text()[-2000:] for p in state.glob("*.log"))
            raise RuntimeError(f"Slurm nodes did not become idle:\n{logs}")
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for _ in range(30):  # let the steps end before their slurmd goes
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
        _stop(pid_files)
        if started_munge:
            _stop([Path("/run/munge/munged.pid")])


def submit(env: dict, script: Path, args: list[str], nodes: int, sbatch_options: list[str] = ()) -> str:
    """sbatch `script` on `nodes` nodes; returns the job id (its output: job-<id>.out beside
    SLURM_CONF)."""
    output = Path(env["SLURM_CONF"]).parent / "job-%j.out"
    return _run("sbatch", "--parsable", f"--nodes={nodes}", f"--output={output}", *sbatch_options, str(script), *args, env=env).strip().split(";")[0]


def job_fields(env: dict, job: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in _run("scontrol", "show", "job", "-o", job, env=env).split() if "=" in f)


def wait_job(env: dict, job: str, timeout: float) -> tuple[str, str, str]:
    """Poll (each second) until `job` has left the queue; cancel it at `timeout`. Returns
    (state, exit code, output)."""
    deadline = time.monotonic() + timeout
    while _run("squeue", "-h", "-j", job, env=env).strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, capture_output=True)
            time.sleep(6)
            break
        time.sleep(1)
    fields = job_fields(env, job)
    text = (Path(env["SLURM_CONF"]).parent / f"job-{job}.out").read_text()
    return fields.get("JobState", "?"), fields.get("ExitCode", "?"), text


def run_batch(env: dict, script: Path, args: list[str], nodes: int, timeout: float, sbatch_options: list[str] = ()) -> tuple[str, str, str]:
    """sbatch `script` on `nodes` nodes, wait and return (state, exit code, output)."""
    return wait_job(env, submit(env, script, args, nodes, sbatch_options), timeout)
