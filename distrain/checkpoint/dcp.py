"""Whole-run checkpoints with torch Distributed Checkpoint (DCP), complete or absent.

A checkpoint is `run.dir/checkpoints/step_NNNNNNNN/` holding:
- the DCP files of `{"model": ..., "optim": ...}`, every tensor under its fully qualified HF
  parameter name with standard placements, so DCP reshards on load into any other layout;
- `train_state.json`: step, global data position and what defines the data stream (seed,
  sequence length, data fingerprint);
- `rng/dp_R.pt`: the RNG states of data-parallel rank R, shared by its TP ranks (random routing or
  dropout must agree across them); a rank whose file is missing keeps the stream seeded for it;
- `config.yaml` (the resolved config) and `tokenizer/`, so export needs nothing else.

It is written under `step_NNNNNNNN.tmp` and renamed only when every rank has written its part,
so a folder named `step_NNNNNNNN` is complete; `check_complete` also verifies that every file
the DCP metadata names is there at its full length. Old checkpoints are pruned by moving them
into `checkpoints/.trash/` first (a rename), so a half-deleted folder never looks like a
checkpoint; the trash is emptied by rank 0 in the background, off the training path. With
`checkpoint.async`, the tensors are copied into host buffers kept for the run (pinned on CUDA;
host memory the size of the rank's state) and written by a background thread
(DCP async save on a gloo group of its own); the rename and pruning happen once the write has
finished, at a later step boundary, the next save or the end of the run.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distrain import faults

_NAME = re.compile(r"^step_(\d{8})$")
# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not by
# group index: the trainer's param groups follow the layout's meshes, the checkpoint must not.
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
_LEFTOVER = re.compile(r"^step_\d{8}\.tmp$")  # an interrupted save
TRASH = ".trash"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The folders named as complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if _NAME.match(p.name) and p.is_dir())


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    complete = list_checkpoints(checkpoints_dir)
    return complete[-1] if complete else None


def check_complete(path: Path) -> str | None:
    """None if `path` holds a whole checkpoint, else what is wrong with it. Reads the DCP metadata
    and file sizes only, never the tensors."""
    if not path.is_dir():
        return "not a folder" if path.exists() else "no such folder"
    for name in (".metadata", "train_state.json", "config.yaml"):
        if not (path / name).is_file():
            return f"{name} is missing (not a distrain checkpoint, or an interrupted save)"
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = pickle.load(f)
        json.loads((path / "train_state.json").read_text())
    except Exception as error:  # noqa: BLE001 - any unreadable byte means a broken checkpoint
        return f"unreadable metadata ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"shard file {name} is missing"
        if file.stat().st_size < size:
            return f"shard file {name} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "train_state.json").read_text())


def discard(path: Path, checkpoints_dir: Path) -> None:
    """Move `path` into the trash (instant: a rename); `Checkpointer` removes it in the background."""
    trash = checkpoints_dir / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    os.replace(path, trash / f"{path.name}-{uuid.uuid4().hex[:8]}")


def prune(checkpoints_dir: Path, keep: int, newest: Path) -> None:
    """Throw out all but the `keep` newest checkpoints (0: keep all); never `newest` (the one just
    written, or the one a run resumes from), whatever the others are named."""
    if keep > 0:
        older = [p for p in list_checkpoints(checkpoints_dir) if p.resolve() != newest.resolve()]
        for old in older[: max(0, len(older) - (keep - 1))]:
            discard(old, checkpoints_dir)  # from here on it is not a checkpoint, whatever remains of it


def clean_leftovers(checkpoints_dir: Path) -> list[Path]:
    """Throw out what interrupted saves left behind; only while no save can be running (the run
    directory's lock is held). Returns what was thrown out."""
    leftovers = [p for p in checkpoints_dir.iterdir() if _LEFTOVER.match(p.name)] if checkpoints_dir.is_dir() else []
    for path in leftovers:
        discard(path, checkpoints_dir)
    return leftovers


class Checkpointer:
    """Saves checkpoints into `checkpoints_dir` (collective: every rank calls `save`)."""

    def __init__(self, checkpoints_dir: Path, keep: int, async_save: bool, config_yaml: Path, tokenizer_dir: Path,
                 device: torch.device, timeout: datetime.timedelta):
        self.dir, self.keep = checkpoints_dir, keep
        self.config_yaml, self.tokenizer_dir = config_yaml, tokenizer_dir
        self.rank = dist.get_rank()
        self.async_group = self.stager = None
        if async_save:
            # NOTE: the background write runs DCP's own collectives; on a group of their own they
            #       cannot interleave with the training step's, and gloo serves CUDA runs too.
            self.async_group = dist.new_group(backend="gloo", timeout=timeout)
            self.stager = _KeptStager(device)
        self.pending: tuple[Any, Path, Path, int] | None = None  # (future, tmp, final, step) in flight
        self.deleting: list[threading.Thread] = []  # rank 0 empties the trash off the training path
        self._empty_trash()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any], rng_name: str | None) -> Path:
        """Write the checkpoint of `step` (asynchronously with `checkpoint.async`). `rng_name`: the
        file this rank's RNG states go to (`dp_R`), None for ranks sharing another rank's stream."""
        self.wait()
        final = self.dir / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        faults.fire("save_begin", step)
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM),
        }
        _to_storage(state, [])
        if rng_name is not None:
            torch.save(_rng_state(), tmp / "rng" / f"{rng_name}.pt")
        if self.rank == 0:
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
            shutil.copy(self.config_yaml, tmp / "config.yaml")
            shutil.copytree(self.tokenizer_dir, tmp / "tokenizer")
        if self.async_group is not None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group, async_stager=self.stager)
            self.pending = (future, tmp, final, step)
            faults.fire("async_staged", step)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        faults.fire("save_written", step)
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            self._publish(tmp, final, step)
        dist.barrier()
        return final

    def poll(self) -> None:
        """At a step boundary: publish the background save if it has finished."""
        if self.pending is not None and self.pending[0].done():
            self._finish()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and published."""
        if self.pending is not None:
            self._finish()

    def close(self) -> None:
        """At the end of the run: wait for the save in flight, free the staging copies."""
        self.wait()
        if self.stager is not None:
            self.stager.release()
            self.stager = None

    def join_deletions(self) -> None:
        """Wait for the trash to be emptied: after the process group is gone (it may take long)."""
        for thread in self.deleting:
            thread.join()
        self.deleting = []

    def _empty_trash(self) -> None:
        if self.rank == 0 and (self.dir / TRASH).is_dir():
            thread = threading.Thread(target=_remove_contents, args=(self.dir / TRASH,), daemon=True)
            thread.start()
            self.deleting.append(thread)

    def _finish(self) -> None:
        future, tmp, final, step = self.pending
        self.pending = None
        future.result()  # raises what the background write raised
        # NOTE: rank 0's future completes after DCP's coordinator wrote `.metadata`, which it does
        #       only once every rank's files are written: rank 0 can publish on its own.
        faults.fire("async_written", step)
        if self.rank == 0:
            self._publish(tmp, final, step)

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        _fsync_tree(tmp)  # DCP synced its own files; the small ones and the folders, for a power cut
        faults.fire("save_before_rename", step)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        faults.fire("save_renamed", step)
        prune(self.dir, self.keep, final)
        faults.fire("prune", step)
        self._empty_trash()

    def tidy(self, resumed: Path) -> None:
        """After a resume from `resumed` loaded: what a crash between a save and its prune left
        beyond `checkpoint.keep` is thrown out (rank 0)."""
        if self.rank == 0 and resumed.resolve().parent == self.dir.resolve():
            prune(self.dir, self.keep, resumed)
            self._empty_trash()


class _KeptStager:
    """DCP's async stager (`AsyncStager` protocol): copies the state into host tensors allocated at
    the first save and reused (pinned on CUDA, so the copy out of the GPU, the only part of a save
    that blocks training, runs at full speed). DTensors are staged as DTensors over the same mesh
    and placements, so DCP plans the copy exactly as the original. `close` does nothing, since
    some torch versions' async_save close the stager they are given after each save; `release`
    frees the copies."""

    should_synchronize_after_execute = False

    def __init__(self, device: torch.device):
        self.pin = device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, state_dict):
        staged = self._copy(state_dict, "")
        if self.pin:
            torch.cuda.synchronize()  # the non-blocking copies have landed before training goes on
        return staged

    @torch.no_grad()
    def _copy(self, tree, key: str):
        if isinstance(tree, dict):
            return {k: self._copy(v, f"{key}/{k}") for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._copy(v, f"{key}/{i}") for i, v in enumerate(tree))
        if isinstance(tree, DTensor):
            return DTensor(self._copy(tree.to_local(), key), tree._spec, requires_grad=False)  # NOTE: from_local would move it to the mesh's device
        if not isinstance(tree, torch.Tensor):
            return tree
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tree.shape or buffer.dtype != tree.dtype or buffer.stride() != tree.stride():
            buffer = self.buffers[key] = torch.empty_like(tree, device="cpu", pin_memory=self.pin and tree.device.type == "cuda")
        return buffer.copy_(tree, non_blocking=buffer.is_pinned())

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass

    def release(self) -> None:
        self.buffers.clear()


def _remove_contents(folder: Path) -> None:
    for entry in list(folder.iterdir()):
        shutil.rmtree(entry, ignore_errors=True)


def all_finite(tensors, device: torch.device) -> bool:
    """Whether every local entry of `tensors` is finite, on every rank (one all-reduce on
    `device`, the one the process group's backend serves)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    local = [t for t in local if t.numel() > 0 and t.is_floating_point()]
    bad = torch.zeros((), device=device)
    if local:
        # NOTE: a sum is a fast read of every entry (an inf-norm is 20x slower on CPU); a NaN or
        #       inf makes it non-finite, and so may a finite overflow: those tensors get the exact test
        sums_finite = torch.stack([t.sum(dtype=torch.float32).to(device) for t in local]).isfinite().tolist()
        suspects = [t for t, ok in zip(local, sums_finite) if not ok]
        bad = torch.tensor(float(any(not torch.isfinite(t).all() for t in suspects)), device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


class CheckpointLoadError(RuntimeError):
    """DCP could not read a checkpoint; raised on every rank at once (DCP gathers read errors)."""


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng_name: str) -> dict[str, Any]:
    """Load model and optimizer (resharding as needed) and this rank's RNG; return train_state."""
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM),
    }
    restore: list = []
    _to_storage(state, restore)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as error:  # DCP raises the latter, not an Exception
        raise CheckpointLoadError(f"checkpoint {path} could not be loaded ({type(error).__name__}): its contents are damaged") from error
    for container, key, held in restore:
        held.to_local().copy_(container[key].redistribute(placements=held.placements).to_local())
        container[key] = held
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIM)
    rng_file = path / "rng" / f"{rng_name}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return read_train_state(path)


def _to_storage(tree, restore: list) -> None:
    """In place: DCP stores every shard as one box of the global tensor, but a packed TP shard (an
    experts `gate_up_proj` holding a slice of the gate rows and one of the up rows,
    `_StridedShard`) is two. Such tensors are replaced by copies sharded contiguously (an
    all-gather over TP each, at checkpoint time only); `restore` collects (container, key, held)
    to put the loaded values back into the held tensors."""
    from distrain.parallel.tensor_parallel import contiguous_placements, is_packed

    for key, value in list(tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if isinstance(value, (dict, list)):
            _to_storage(value, restore)
        elif is_packed(value):
            tree[key] = value.redistribute(placements=contiguous_placements(value.placements))
            restore.append((tree, key, value))


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".distcp"):
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
