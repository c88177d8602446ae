"""Whole-run checkpoints with torch Distributed Checkpoint (DCP), complete or absent.

A checkpoint is `run.dir/checkpoints/step_NNNNNNNN/` holding:
- the DCP files of `{"model": ..., "optim": ...}`, every tensor under its fully qualified HF
  parameter name with standard placements, so DCP reshards on load into any other layout;
- `train_state.json`: step, global data position and data fingerprint, wandb run id;
- `rng/dp_R.pt`: the RNG states of data-parallel rank R, shared by its TP ranks (random routing or
  dropout must agree across them); a rank whose file is missing keeps the stream seeded for it;
- `config.yaml` (the resolved config) and `tokenizer/`, so export needs nothing else.

It is written under `step_NNNNNNNN.tmp` and renamed only when every rank has finished, so a
folder without `.tmp` is always complete; resume takes the newest one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_NAME = re.compile(r"^step_(\d{8})$")
# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not by
# group index: the trainer's param groups follow the layout's meshes, the checkpoint must not.
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    if not checkpoints_dir.is_dir():
        return None
    complete = sorted(p for p in checkpoints_dir.iterdir() if _NAME.match(p.name) and p.is_dir())
    return complete[-1] if complete else None


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    config_yaml: Path,
    tokenizer_dir: Path,
    keep: int,
    rng_name: str | None,
) -> Path:
    """`rng_name`: the file this rank's RNG states go to (`dp_R`), None for ranks that share
    another rank's stream."""
    rank = dist.get_rank()
    final = checkpoints_dir / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM),
    }
    _to_storage(state, [])
    dcp.save(state, checkpoint_id=str(tmp))
    if rng_name is not None:
        torch.save(_rng_state(), tmp / "rng" / f"{rng_name}.pt")
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
        shutil.copy(config_yaml, tmp / "config.yaml")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
        _prune(checkpoints_dir, keep)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng_name: str) -> dict[str, Any]:
    """Load model and optimizer (resharding as needed) and this rank's RNG; return train_state."""
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIM),
    }
    restore: list = []
    _to_storage(state, restore)
    dcp.load(state, checkpoint_id=str(path))
    for container, key, held in restore:
        held.to_local().copy_(container[key].redistribute(placements=held.placements).to_local())
        container[key] = held
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIM)
    rng_file = path / "rng" / f"{rng_name}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "train_state.json").read_text())


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


def _prune(checkpoints_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in checkpoints_dir.iterdir() if _NAME.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
