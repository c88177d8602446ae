"""One rank: init the process group from the config, agree on the run, train, tear down.

`python -m distrain.launch.worker CONFIG_YAML` is what the local launcher starts on each rank.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from distrain.config import ConfigError, JobConfig, read_config_yaml, to_dict
from distrain.config.load import to_job_config
from distrain.train import stop

RENDEZVOUS_S = 1800  # how long the first rank at the rendezvous waits for the last


def resolve_device(job: JobConfig) -> torch.device:
    kind = job.run.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
        # NOTE: a launcher that binds each task to its own GPU (srun --gpus-per-task=1) shows it one
        local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        index = 0 if visible == 1 else local_rank
        if index >= visible:
            raise ValueError(f"local rank {local_rank} on a node showing {visible} CUDA GPUs; run at most {visible} ranks per node")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(job: JobConfig, device: torch.device) -> None:
    backend = job.launcher.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and job.parallel.cpu_offload:
        backend = "cpu:gloo,cuda:nccl"  # offloaded gradients are reduced on the host (gradient norm)
    timeout = datetime.timedelta(seconds=job.launcher.timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "RANK" in os.environ:
        # NOTE: ranks that prepare the run on their own (srun tasks: the weights downloaded and the
        #       token store built or waited for, per node) reach the rendezvous minutes apart; it
        #       waits up to RENDEZVOUS_S for them, the collectives after it launcher.timeout_s
        dist.init_process_group(backend, timeout=max(timeout, datetime.timedelta(seconds=RENDEZVOUS_S)), **kwargs)
        distributed_c10d._set_pg_timeout(timeout)
    else:  # a world of one, so that meshes, DCP and collectives work the same everywhere
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)


@contextlib.contextmanager
def console_log():
    """Rank 0's console also goes to `train.log` in the run directory, from when the run directory
    is decided (`open(path)`) to the end of the run; progress-bar redraws stay on the console."""
    class Log:
        file = None

        def open(self, path: Path) -> None:
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed below
            sys.stdout, sys.stderr = _Tee(saved[0], self.file), _Tee(saved[1], self.file)

    saved, log = (sys.stdout, sys.stderr), Log()
    try:
        yield log
    finally:
        sys.stdout, sys.stderr = saved
        if log.file is not None:
            log.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text:  # a progress bar redrawing its line: the console's alone
            self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_third_party() -> None:
    """Ranks other than 0 keep third-party warnings and progress bars to themselves: rank 0 shows
    each once (torch's mesh-slicing UserWarning, transformers' loading bars)."""
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def agree(job: JobConfig, log=None) -> tuple[JobConfig, list[str]]:
    """Rank 0 decides the run (its config, including `run.dir`, and the checkpoints to resume,
    the chosen one then its fallbacks; see `distrain.launch.run_dir.prepare_run`) and every rank
    takes its decision: ranks that composed their own configs (torchrun, srun) may have named
    different directories."""
    decision: list = [None]
    failed = None
    if dist.get_rank() == 0:
        from distrain.data.corpus import prepare_corpus
        from distrain.launch.run_dir import prepare_run

        try:
            resume, lines = prepare_run(job, prepare_corpus(job.data)[1])
            if log is not None:
                log.open(Path(job.run.dir) / "train.log")
            print("\n".join(lines), flush=True)
            decision = [(to_dict(job), [str(p) for p in ([resume.path, *resume.fallbacks] if resume.path else [])])]
        except Exception as error:  # noqa: BLE001 - the other ranks must hear of it, not wait for it
            failed = error
            decision = [("config error" if isinstance(error, ConfigError) else "error", str(error))]
    dist.broadcast_object_list(decision, src=0)
    first, second = decision[0]
    if failed is not None:
        raise failed
    if first == "config error":
        raise ConfigError(second)
    if first == "error":
        raise RuntimeError(f"rank 0 could not prepare the run: {second}")
    return to_job_config(first), second


def run(job: JobConfig) -> int:
    with console_log() as log:
        return _run(job, log)


def _run(job: JobConfig, log) -> int:
    from distrain.train.trainer import Trainer

    stop.install()
    device = resolve_device(job)
    init_distributed(job, device)
    rank = dist.get_rank()
    if rank != 0:
        quiet_third_party()
    try:
        job, resume_from = agree(job, log)
        trainer = Trainer(job, device, [Path(p) for p in resume_from])
        if trainer.is_main:
            print("\n".join(trainer.startup_lines()), flush=True)
        status = trainer.train()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # NOTE: what rank 0 alone does last (closing wandb, the export) runs outside every collective:
    #       it may take longer than launcher.timeout_s; the other ranks have exited already.
    if trainer.metrics is not None:
        trainer.metrics.close()
    if status == 0 and job.checkpoint.export and trainer.is_main:
        from distrain.checkpoint.dcp import latest_checkpoint
        from distrain.checkpoint.export import export_checkpoint

        last = latest_checkpoint(trainer.run_dir / "checkpoints")
        if last is not None:
            out = export_checkpoint(last, trainer.run_dir / "export", dtype=getattr(torch, job.checkpoint.export_dtype), force=True,
                                    max_shard_size=job.checkpoint.export_shard_size)
            print(f"exported {last.name} to {out}", flush=True)
            if job.checkpoint.push_to_hub:
                from distrain.checkpoint.export import push_to_hub

                try:  # the run and its export are done and on disk: a failed upload says so and loses nothing
                    print(f"uploaded {out} to {push_to_hub(out, job.checkpoint.push_to_hub)}", flush=True)
                except Exception as error:  # noqa: BLE001 - network, token, permissions: all the user's to fix
                    print(f"checkpoint.push_to_hub={job.checkpoint.push_to_hub}: upload failed ({type(error).__name__}: {error}); "
                          f"the export is at {out}; upload it with `huggingface-cli upload {job.checkpoint.push_to_hub} {out}`", flush=True)
                    status = 1
    trainer.checkpointer.join_deletions()
    # NOTE: after the ranks agreed to stop, rank 0 alone carries the status: srun
    #       --kill-on-bad-exit kills the tasks still running when one exits non-zero, and rank 0
    #       may still be closing wandb when the others are done
    return status if rank == 0 or status not in stop.STOP_STATUSES else 0


def watch_parent() -> None:
    """Die with the launcher: torch's elastic agent starts workers in sessions of their own, so a
    SIGKILL of the launcher (or of its process group) would leave them training as orphans."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="distrain-watch-parent", daemon=True).start()


def main() -> None:
    faulthandler.enable()  # a native crash (a segfault, a heap abort) names the Python stack of every thread
    watch_parent()
    run_and_exit(read_config_yaml(sys.argv[1]))


def _peer_gone(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank's process ended."""
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "DistNetworkError"))


def _report_failure() -> None:
    """Tell the launcher this rank failed, and when: it names the rank that failed first."""
    folder = os.environ.get("DISTRAIN_FAILURE_DIR")
    if folder:
        try:
            Path(folder, f"rank{os.environ.get('RANK', '0')}").write_text(repr(time.time()))
        except OSError:
            pass


def run_and_exit(job: JobConfig) -> None:
    """Run this rank and exit with its status: a config error is one line, a bug a traceback."""
    status = 1
    try:
        status = run(job)
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank has it (rank 0 decided); one says it
            print(f"distrain: config error: {error}", file=sys.stderr)
        status = 2
    except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException is not an Exception
        if _peer_gone(error):  # a consequence: the rank that failed first prints its own traceback
            print(f"distrain: rank {os.environ.get('RANK', '0')} stopped: a peer rank's process ended ({type(error).__name__})",
                  file=sys.stderr)
        else:
            traceback.print_exc()
            _report_failure()
    finally:
        # NOTE: exit without interpreter teardown: gloo sometimes aborts in its destructors
        #       after destroy_process_group, turning a finished run into a SIGABRT.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    main()
