"""A DCP checkpoint -> a folder that `AutoModelForCausalLM.from_pretrained` loads.

The model is rebuilt from the checkpoint's own `config.yaml`, its tensors read with DCP (any
layout it was saved under), and written with `save_pretrained`, which converts distrain's
in-memory names (e.g. fused 3-D experts) back to the model's hub key format. The tokenizer saved
in the checkpoint is copied beside it.

OUT_DIR is complete or absent: the export is written to a temporary folder beside it (removed if
anything fails) and renamed. An existing OUT_DIR is never replaced, unless it is empty or
`force` is set and it holds a previous export (its `distrain_export.json` says so): a run
directory, a checkpoint or any other folder of the user's is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from distrain import faults
from distrain.checkpoint.dcp import check_complete, read_train_state
from distrain.config import ConfigError
from distrain.config.load import read_config_yaml
from distrain.models import build_config, meta_model, to_empty

MARKER = "distrain_export.json"


def load_full_model(checkpoint_dir: Path):
    """The whole model of a checkpoint, in one process on the CPU (whatever layout saved it)."""
    problem = check_complete(checkpoint_dir)
    if problem is not None:
        raise ConfigError(f"{checkpoint_dir}: not a complete distrain checkpoint ({problem}); pass a run.dir/checkpoints/step_NNNNNNNN folder")
    job = read_config_yaml(checkpoint_dir / "config.yaml")
    model = meta_model(build_config(job.model))
    to_empty(model, torch.device("cpu"))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def check_export_target(out_dir: Path, force: bool) -> None:
    """Refuse a target that would destroy something: exit 2 with what to do instead."""
    if not out_dir.exists():
        if out_dir.parent.exists() and not out_dir.parent.is_dir():
            raise ConfigError(f"export target {out_dir}: {out_dir.parent} is a file, not a folder; pick another OUT_DIR")
        return
    if not out_dir.is_dir():
        raise ConfigError(f"export target {out_dir} is a file; pick a new folder for OUT_DIR")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MARKER).is_file():
        raise ConfigError(f"export target {out_dir} exists and is not empty (and not a distrain export); pick a new folder for OUT_DIR")
    if not force:
        raise ConfigError(f"export target {out_dir} holds a previous export; pass --force to replace it, or pick a new folder")


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_export_target(out_dir, force)
    model = load_full_model(checkpoint_dir)
    model.to(dtype)
    model.config.use_cache = True  # the export is for inference as much as for training
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if (checkpoint_dir / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(checkpoint_dir / "tokenizer").save_pretrained(tmp)
        faults.fire("export")
        step = read_train_state(checkpoint_dir)["step"]
        (tmp / MARKER).write_text(json.dumps({"checkpoint": str(checkpoint_dir.resolve()), "step": step, "dtype": str(dtype)}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; a previous export there (checked by the caller) is moved aside
    first and removed only once `new` is in place."""
    if target.exists() and any(target.iterdir()):
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
