"""A DCP checkpoint -> a folder that `AutoModelForCausalLM.from_pretrained` loads.

The model is built on the meta device from the checkpoint's own `config.yaml` (no memory), then
written module by module: each module's tensors are read with DCP (only their bytes, whatever
layout saved them), cast to the export dtype, converted from distrain's in-memory names (e.g. fused
3-D experts) to the model's hub key format by transformers' own reverse weight conversion, and
appended to safetensors shards of at most `max_shard_size`; an index json maps every hub key to its
shard, as on the hub. Memory: about one shard plus the largest module, never the whole model.
Beside the weights: config.json, generation_config.json (models that generate) and the tokenizer
saved in the checkpoint.

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
from distrain.checkpoint.hf_import import DTYPES
from distrain.config import ConfigError
from distrain.config.load import read_config_yaml
from distrain.config.schema import parse_size
from distrain.models import build_config, init_non_persistent_buffers, meta_model, to_empty

MARKER = "distrain_export.json"


def _checkpoint_job(checkpoint_dir: Path):
    """The config a complete checkpoint was written with, or ConfigError."""
    problem = check_complete(checkpoint_dir)
    if problem is not None:
        raise ConfigError(f"{checkpoint_dir}: not a complete distrain checkpoint ({problem}); pass a run.dir/checkpoints/step_NNNNNNNN folder")
    return read_config_yaml(checkpoint_dir / "config.yaml")


def load_full_model(checkpoint_dir: Path):
    """The whole model of a checkpoint, in one process on the CPU (whatever layout saved it)."""
    job = _checkpoint_job(checkpoint_dir)
    model = meta_model(build_config(job.model))
    to_empty(model, torch.device("cpu"))
    init_non_persistent_buffers(model)  # rotary frequencies and the like: in no checkpoint
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


def export_checkpoint(
    checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, force: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_export_target(out_dir, force)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as error:
        raise ConfigError(f"export shard size: {error}") from None
    job = _checkpoint_job(checkpoint_dir)
    model = meta_model(build_config(job.model))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_weights(model, checkpoint_dir, tmp, dtype, shard_bytes)
        config = model.config
        config.use_cache = True  # the export is for inference as much as for training
        config.dtype = dtype
        if (checkpoint_dir / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir / "tokenizer")
            tokenizer.save_pretrained(tmp)
            # the special tokens the model was trained with are the tokenizer's
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                if getattr(tokenizer, key, None) is not None:
                    setattr(config, key, getattr(tokenizer, key))
        config.save_pretrained(tmp)
        if model.can_generate():
            from transformers import GenerationConfig

            generation = GenerationConfig.from_model_config(config)  # the ids above; generate() uses its cache
            generation.use_cache = True
            generation.save_pretrained(tmp)
        for path in tmp.iterdir():  # readable by the user's group and others, as save_pretrained's are
            path.chmod(0o644 if path.is_file() else 0o755)
        faults.fire("export")
        step = read_train_state(checkpoint_dir)["step"]
        (tmp / MARKER).write_text(json.dumps({"checkpoint": str(checkpoint_dir.resolve()), "step": step, "dtype": str(dtype)}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_weights(model, checkpoint_dir: Path, folder: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Module by module: DCP read -> dtype -> hub keys -> shards; then the shards' final names and the index."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()  # meta tensors: names, shapes and dtypes
    names = list(remove_tied_weights_from_state_dict(dict(state), model))  # safetensors holds one of tied weights
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    shards = _ShardWriter(folder, shard_bytes)
    for module_names in modules.values():
        tensors = {name: torch.empty(state[name].shape, dtype=state[name].dtype) for name in module_names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": tensors}, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
        hub = revert_weight_conversion(model, {name: t.to(dtype) for name, t in tensors.items()})
        del tensors
        for key, tensor in hub.items():
            shards.add(key, tensor.contiguous())
    shards.close(total_parameters=sum(state[n].numel() for n in names))


class _ShardWriter:
    """Safetensors shards of at most `shard_bytes` (a larger tensor gets one of its own), written
    as tensors arrive: each tensor's bytes go straight to the file after a reserved header space,
    and the header (JSON, padded with spaces as the format allows) is written last, so no shard is
    ever held in memory. Named as transformers names them: `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`."""

    HEADER_SPACE = 1 << 20  # bytes reserved for a shard's header: about 8,000 tensors' entries

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.written: list[list[str]] = []  # keys of each finished shard, in order
        self.file, self.entries, self.offset, self.header_estimate = None, {}, 0, 0
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [self.offset, self.offset + size]}
        # NOTE: its header entry as written (a byte over: braces for the comma), with this shard's
        #       offsets, which are the largest it can get (a new shard starts them at 0)
        entry_bytes = len(json.dumps({key: entry}, separators=(",", ":")))
        if self.file is not None and (self.offset + size > self.shard_bytes or self.header_estimate + entry_bytes > self.HEADER_SPACE - 8):
            self._finish()
        if self.file is None:
            self.file = open(self.folder / f"shard-{len(self.written)}.tmp", "wb")
            self.file.seek(self.HEADER_SPACE)
            self.entries, self.offset, self.header_estimate = {}, 0, len('{"__metadata__":{"format":"pt"}}')
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.entries[key] = {**entry, "data_offsets": [self.offset, self.offset + size]}
        self.offset += size
        self.header_estimate += entry_bytes
        self.total_bytes += size

    def _finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        space = self.HEADER_SPACE - 8
        assert len(header) <= space, (len(header), space)
        self.file.seek(0)
        self.file.write(space.to_bytes(8, "little") + header + b" " * (space - len(header)))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.written.append(list(self.entries))
        self.file = None

    def close(self, total_parameters: int) -> None:
        if self.file is not None:
            self._finish()
        count = len(self.written)
        if count == 1:
            os.replace(self.folder / "shard-0.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.tmp", self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an export folder to a hub model repository (created private if missing); needs a
    network and a token (`huggingface-cli login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=f"distrain export of {folder}",
                      ignore_patterns=[MARKER])
    return f"https://huggingface.co/{repo_id}"


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
