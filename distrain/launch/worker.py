"""One rank: init the process group from the config, train, tear down.

`python -m distrain.launch.worker CONFIG_YAML` is what the local launcher starts on each rank.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

from distrain.config import JobConfig, read_config_yaml


def resolve_device(job: JobConfig) -> torch.device:
    kind = job.run.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(job: JobConfig, device: torch.device) -> None:
    backend = job.launcher.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=job.launcher.timeout_s)
    if "RANK" in os.environ:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:  # a world of one, so that meshes, DCP and collectives work the same everywhere
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def run(job: JobConfig) -> int:
    from distrain.train.trainer import Trainer

    device = resolve_device(job)
    init_distributed(job, device)
    try:
        Trainer(job, device).train()
    finally:
        dist.destroy_process_group()
    return 0


def main() -> None:
    job = read_config_yaml(sys.argv[1])
    status = 1
    try:
        status = run(job)
    except BaseException:  # noqa: BLE001 - DCP's CheckpointException is not an Exception
        traceback.print_exc()
    finally:
        # NOTE: exit without interpreter teardown: gloo sometimes aborts in its destructors
        #       after destroy_process_group, turning a finished run into a SIGABRT.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    main()
