"""A DCP checkpoint -> a folder that `AutoModelForCausalLM.from_pretrained` loads.

The model is rebuilt from the checkpoint's own `config.yaml`, its tensors read with DCP (any
layout it was saved under), and written with `save_pretrained`, which converts distrain's
in-memory names (e.g. fused 3-D experts) back to the model's hub key format. The tokenizer saved
in the checkpoint is copied beside it. The export is written to a temporary name and renamed, so
OUT_DIR is complete or absent.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from distrain.config.load import read_config_yaml
from distrain.models import build_config, meta_model, to_empty


def load_full_model(checkpoint_dir: Path):
    """The whole model of a checkpoint, in one process on the CPU (whatever layout saved it)."""
    if not (checkpoint_dir / ".metadata").exists() or not (checkpoint_dir / "config.yaml").exists():
        raise ValueError(f"{checkpoint_dir}: not a complete distrain checkpoint (no .metadata or config.yaml)")
    job = read_config_yaml(checkpoint_dir / "config.yaml")
    model = meta_model(build_config(job.model))
    to_empty(model, torch.device("cpu"))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    model = load_full_model(checkpoint_dir)
    model.to(dtype)
    model.config.use_cache = True  # the export is for inference as much as for training
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if (checkpoint_dir / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(checkpoint_dir / "tokenizer").save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
