"""Gloo ranks started once per test session, each running distrain's own rank entry
(`distrain.launch.worker.run`), or any function that sets up its own process group, for one job
after another.

Process start-up (importing torch and transformers) dominates a tiny run on 2 cores; these ranks
pay it once. A job is composed and validated in the test process exactly as `distrain train`
does it (`distrain.cli.validate_train`), then its first `nproc_per_node` ranks join a fresh
process group (a new rendezvous port per job) and train it; a world of one runs on rank 0 the
way a single process does.

Each rank imports once and forks a child per job, so every job starts in a process that has run
nothing, as a worker of `distrain train` does: no process group, mesh cache, thread pool, fault
spec, stop signal or lock of an earlier job is left in it. (Long-lived ranks running job after
job kept every job's gloo groups and their I/O threads, and their heap was once found corrupted
mid-run: CI, stop 20.) The rank alone answers on the connection: a child hands its answer
back through a pipe, and one that dies without handing it back is answered for, with how it died.

A rank that fails or a job that outlives its timeout stops every rank; the error names each
rank's last output lines, and the next job starts new ranks.

    python tests/ranks.py ADDRESS:PORT RANK   (what `Ranks` starts; not for users)
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import warnings
from multiprocessing.connection import Client, Listener
from pathlib import Path

WORLD = 4
AUTHKEY_ENV = "DISTRAIN_TEST_RANKS_KEY"
DIED = "died: "  # how a rank answers for a job whose process died without answering


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    def __init__(self, logs: Path, world: int = WORLD):
        self.logs, self.world = logs, world
        self.procs: list[subprocess.Popen] = []
        self.conns: list = []
        self.jobs = 0

    def start(self) -> None:
        key = secrets.token_bytes(16)
        with Listener(("127.0.0.1", 0), authkey=key) as listener:
            env = {**os.environ, AUTHKEY_ENV: key.hex(), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
            for rank in range(self.world):
                log = open(self.logs / f"rank{rank}.log", "a")  # noqa: SIM115 - the rank's for its life
                self.procs.append(subprocess.Popen(
                    [sys.executable, __file__, f"{listener.address[0]}:{listener.address[1]}", str(rank)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                ))
                log.close()
            conns = {}
            listener._listener._socket.settimeout(120)  # a rank that dies starting must not hang the tests
            try:
                for _ in range(self.world):
                    conn = listener.accept()
                    conns[conn.recv()] = conn
            except OSError as error:
                tails = self.tails()
                self.stop()
                raise AssertionError(f"the test ranks did not start ({error})\n{tails}") from None
        self.conns = [conns[rank] for rank in range(self.world)]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def tails(self, lines: int = 25) -> str:
        out = []
        for rank in range(self.world):
            text = (self.logs / f"rank{rank}.log").read_text(errors="replace").splitlines()
            out.append(f"--- rank {rank} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def job_logs(self, nproc: int) -> list[str]:
        """What the last job printed on each of its ranks (stdout and stderr)."""
        marker = f"=== job {self.jobs}: "
        return [(self.logs / f"rank{rank}.log").read_text(errors="replace").rpartition(marker)[2] for rank in range(nproc)]

    def run(self, items: list[str], env: dict[str, str] | None = None, timeout: float = 300, killed: bool = False) -> list:
        """Compose and validate `distrain train ITEMS`, run it on its ranks and return each
        rank's exit status (rank 0's carries the run's, as with the CLI). A config error is
        raised here, before any rank starts the job. `killed`: a job whose DISTRAIN_FAULT kills it
        (`kill@...`): as soon as one rank's process dies of SIGKILL the others' are killed too, as
        the fault kills a job the CLI launched (the launcher and every worker); each rank's
        (failed, status or how it died) is returned."""
        from distrain.cli import _load, validate_train
        from distrain.launch.run_dir import release

        job = _load(items)
        validate_train(job)
        release()
        return self.call(job.launcher.nproc_per_node, "distrain.launch.worker:run", job, env=env, timeout=timeout, what=" ".join(items),
                         killed=killed)

    def train(self, items: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> None:
        """Run a job that must succeed on every rank."""
        statuses = self.run(items, env, timeout)
        if any(statuses):
            raise AssertionError(f"job {self.jobs} ({' '.join(items)}) exited {statuses}\n{self.tails()}")

    def call(self, nproc: int, function: str, *args, env: dict[str, str] | None = None, timeout: float = 300, what: str = "",
             again: bool = True, killed: bool = False) -> list:
        """`module:function(*args)` on ranks 0..nproc-1 with the torch.distributed environment of
        a world of `nproc` (none for a world of one); returns each rank's result. The function
        initializes and destroys its process group; an exception is a failed job.

        A job whose rank's process died in native code (a signal) runs once more, with a warning
        that names the rank, the signal and the Python stack it died in (a gloo rank on CPU died
        of a heap corruption at random steps inside DTensor's asynchronous reduce-scatter, CI stop
        20: distrain's TP no longer issues those, `test_tp_collectives_are_waited_where_they_are_issued`;
        a warning here is a crash to look into). A job that dies twice fails. `killed`: see `run`
        (no second run; each rank's (failed, value) is returned)."""
        from distrain.train.stop import STOP_STATUSES

        assert nproc <= self.world, f"the test ranks are {self.world}; the job asks for {nproc}"
        if not self.procs:
            self.start()
        self.jobs += 1
        what = what or function
        port = _free_port()
        threads = max(1, (os.cpu_count() or 1) // nproc)
        for rank in range(nproc):
            rank_env = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} if nproc > 1 else {}
            try:
                self.conns[rank].send({"call": function, "args": args, "env": {**rank_env, **(env or {})}, "threads": threads, "number": self.jobs})
            except OSError as error:  # the rank's process is gone
                tails = self.tails()
                self.stop()
                raise AssertionError(f"job {self.jobs} ({what}) could not reach rank {rank} ({error})\n{tails}") from None
        results: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(results) < nproc:
            for rank in range(nproc):
                if rank not in results and self.conns[rank].poll(0.05):
                    results[rank] = self.conns[rank].recv()
                    failed, value = results[rank]
                    if killed and failed and isinstance(value, str) and value.endswith("killed by SIGKILL"):
                        self._kill_jobs(nproc)
                    if failed or (function.endswith(":run") and value not in (0, *STOP_STATUSES)):
                        deadline = min(deadline, time.monotonic() + 30)  # its peers end soon after it, or never
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                tails = self.tails()
                self.stop()
                raise AssertionError(f"job {self.jobs} ({what}) did not end on every rank within {timeout} s (ended: {results})\n{tails}")
        if killed:
            return [results[rank] for rank in range(nproc)]
        died = [value for failed, value in results.values() if failed and isinstance(value, str) and value.startswith(DIED)]
        if died and again:
            warnings.warn(f"job {self.jobs} ({what}): {'; '.join(died)}; running it once more\n{self.tails(40)}", stacklevel=2)
            return self.call(nproc, function, *args, env=env, timeout=timeout, what=what, again=False)
        if any(failed for failed, _ in results.values()):
            raise AssertionError(f"job {self.jobs} ({what}) raised on ranks {[r for r, (f, _) in sorted(results.items()) if f]}\n{self.tails()}")
        return [results[rank][1] for rank in range(nproc)]

    def _kill_jobs(self, nproc: int) -> None:
        """SIGKILL the job's process on each of the first `nproc` ranks (each rank's one child)."""
        from distrain.launch.procs import child_pids

        for proc in self.procs[:nproc]:
            for pid in child_pids(proc.pid):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass


# what every job imports: loaded once, before any job, in the process each job is forked from
PRELOAD = (
    "torch.distributed.fsdp", "torch.distributed.tensor.parallel", "torch.distributed.checkpoint",
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "transformers", "transformers.models.auto.modeling_auto",
    "distrain.launch.worker", "distrain.train.trainer", "distrain.checkpoint.export", "distrain.cli", "rank_jobs", "layouts",
)
# packages whose modules a job imported are imported after it, for the jobs forked later (none of
# these starts a thread on import; a fork keeps only the forking thread)
LEARNED = ("torch", "transformers", "distrain", "safetensors", "huggingface_hub", "tokenizers", "fsspec", "numpy", "PIL")


def _serve(address: str, rank: int) -> None:
    """One rank: fork a child per job, which runs the function sent and hands its answer back
    through a pipe; this process alone answers on the connection (a child that died without
    handing one back is answered for, with how it ended), and only imports."""
    import faulthandler
    import importlib
    import pickle
    import signal

    faulthandler.enable(all_threads=True)  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    for module in PRELOAD:
        importlib.import_module(module)
    # NOTE: transformers builds its table of checkpoint key conversions (about 1,100 regular
    #       expressions: 1.1 s of every rank of every job) on first use: once here, for all
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("llama")
    learning = True
    conn.send(rank)
    while True:
        message = conn.recv()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _run_job(message, rank, write_fd)  # never returns
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as handed:
            data = handed.read()
        _, status = os.waitpid(pid, 0)
        try:
            reply, modules = pickle.loads(data)
        except Exception:  # noqa: BLE001 - nothing, or a part: the child died before handing its answer back
            how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status) else f"exited {os.WEXITSTATUS(status)}"
            print(f"=== job {message['number']}: the rank's process {how} without answering", flush=True)
            reply, modules = (True, f"{DIED}rank {rank} {how}"), []
        conn.send(reply)
        for module in modules if learning else ():
            if module.split(".")[0] in LEARNED:
                try:
                    importlib.import_module(module)
                except Exception:  # noqa: BLE001 - only a head start for the jobs after it
                    pass
        threads = len(os.listdir("/proc/self/task"))
        if learning and threads > 1:  # a thread holding a lock at a fork would hang the child
            print(f"=== rank {rank}: {threads} threads after importing what job {message['number']} imported; no more imports learned", flush=True)
            learning = False


def _run_job(message: dict, rank: int, handed_fd: int) -> None:
    """The forked child: run one job, hand (its answer, the modules it imported) to the rank
    through `handed_fd`, exit without interpreter teardown (as distrain's workers do: gloo may
    abort in its destructors)."""
    import importlib
    import pickle
    import traceback

    import torch

    from distrain.config import ConfigError

    status = 1
    try:
        before = set(sys.modules)
        os.environ.update(message["env"])
        torch.set_num_threads(message["threads"])
        print(f"=== job {message['number']}: {message['call']} on rank {rank} of {os.environ.get('WORLD_SIZE', 1)}", flush=True)
        module, name = message["call"].split(":")
        try:
            reply = (False, getattr(importlib.import_module(module), name)(*message["args"]))
        except ConfigError as error:  # as the worker's own entry says it
            print(f"distrain: config error: {error}", flush=True)
            reply = (False, 2)
        except BaseException:  # noqa: BLE001 - DCP's CheckpointException is not an Exception
            traceback.print_exc()
            reply = (message["call"] != "distrain.launch.worker:run", 1)  # a training rank's failure is its status
        try:
            data = pickle.dumps((reply, sorted(set(sys.modules) - before)))
        except Exception:  # noqa: BLE001 - a result that cannot travel fails the job, saying why
            traceback.print_exc()
            data = pickle.dumps(((True, f"rank {rank}: the result of {message['call']} cannot be pickled"), []))
        with os.fdopen(handed_fd, "wb") as handed:
            handed.write(data)
        status = 0
    except BaseException:  # noqa: BLE001 - a bug of this harness: its traceback, and the rank answers for the child
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
