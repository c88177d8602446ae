"""Hub-format safetensors -> a sharded model, each rank reading only what it holds.

`model.name_or_path` is a local folder or a hub id (downloaded once into the hub cache; needs a
network). Every rank maps the checkpoint's keys to the model's own parameter names with
transformers' weight conversion mapping (the same rules `from_pretrained` applies: renamings, and
converters such as per-expert 2-D weights -> the fused 3-D expert tensors), then fills its shards:
- a tensor that is only renamed is read as the rank's box of it (the box's rows, by positioned
  reads of the file: nothing memory-mapped), the bytes of this rank's shard;
- a converted tensor is built from its sources, one at a time. Where it stacks per-expert
  tensors on its first dim (the fused experts of every MoE family: transformers' `MergeModulelist`,
  then at most a concatenation on another dim) and the rank holds a range of experts (EP, FSDP),
  only that range's sources are read (per expert, a few MB each); other conversions (fused
  projections) are built whole and sliced.
Keys are taken in transformers' order (numbers as numbers: expert 2 before expert 10), which fixes
the order in which a converter stacks them. Peak host memory per rank: its shards plus the largest
converted tensor it builds (its experts' share of one layer's), never the model.
Weights are cast to the parameters' dtype (fp32 master weights).
"""

from __future__ import annotations

import json
import math
from copy import deepcopy
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn


def safetensors_folder(name_or_path: str, cached: bool = False) -> Path | None:
    """The folder holding the model's safetensors (a hub id is downloaded into the hub cache;
    `cached`: taken from the cache, no network: the workers, after the CLI downloaded it), or
    None when it has none (e.g. only pytorch_model.bin): then the weights are loaded whole."""
    local = Path(name_or_path).expanduser()
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"], local_files_only=cached))
    return local if any(local.glob("*.safetensors")) else None


def _key_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    return {key: path for path in sorted(folder.glob("*.safetensors")) for key in _header(path)[1] if key != "__metadata__"}


# safetensors' dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _header(path: Path) -> tuple[int, dict]:
    """(where the data start, the JSON header) of a safetensors file."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


class _Reader:
    """Reads tensors, or row ranges of them, with plain positioned reads: nothing is memory-mapped,
    so a rank's resident memory holds what it read and no more (a mapped file's touched pages would
    count against the rank until it is closed)."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.headers = files, {}

    def _entry(self, key: str):
        path = self.files[key]
        if path not in self.headers:
            self.headers[path] = _header(path)
        start, header = self.headers[path]
        entry = header[key]
        return path, start + entry["data_offsets"][0], DTYPES[entry["dtype"]], list(entry["shape"])

    @staticmethod
    def _read(path: Path, offset: int, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            while done < nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise ValueError(f"{path}: ends before its tensor data does (a truncated download?)")
                done += got
        return buffer

    def whole(self, key: str) -> torch.Tensor:
        path, offset, dtype, shape = self._entry(key)
        count = math.prod(shape)
        return self._read(path, offset, count * dtype.itemsize).view(dtype).reshape(shape)

    def box(self, key: str, offsets, sizes) -> torch.Tensor:
        """The box [offsets, offsets + sizes): its rows read at once, the other dims sliced after."""
        path, offset, dtype, shape = self._entry(key)
        if not shape:
            return self.whole(key)
        row = math.prod(shape[1:]) * dtype.itemsize
        rows = self._read(path, offset + offsets[0] * row, sizes[0] * row).view(dtype).reshape([sizes[0], *shape[1:]])
        return rows[(slice(None), *(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:])))]


class KeyMap(NamedTuple):
    """How a checkpoint's keys become the model's tensors, from names alone (`map_keys`)."""

    folder: Path
    key_files: dict[str, Path]
    renamed: dict  # in-memory name -> hub key
    converted: dict  # first target name -> (converter, [(hub key, source pattern)])
    missing: list[str]


def map_keys(model: nn.Module, folder: Path) -> KeyMap:
    """Map the checkpoint's keys to `model`'s parameter names, on the model as transformers built it
    (on meta is enough): transformers looks its conversion rules up by the model's class name,
    which FSDP changes (`FSDP<name>`), so this runs before sharding; the names do not change."""
    key_files = _key_files(folder)
    return KeyMap(folder, key_files, *_plan(model, key_files))


def load_sharded(model: nn.Module, keys: KeyMap) -> None:
    """Fill every parameter and persistent buffer of `model` (already sharded and allocated) with its
    local part of the checkpoint `keys` maps."""
    if keys.missing:
        raise ValueError(_missing_message(keys.folder, keys.missing))
    targets = _targets(model)
    reader = _Reader(keys.key_files)
    for name, key in keys.renamed.items():
        if name in targets:
            _fill_box(targets[name], reader, key)
    for first, (converter, sources) in keys.converted.items():
        held = _expert_range(converter, first, targets, sources)
        if held is not None:
            if held[0] == held[1]:
                continue  # no experts here (FSDP's padding)
            sources = _of_experts(sources, held)
        converter = deepcopy(converter)
        for key, pattern in sources:
            converter.add_tensor(first, key, pattern, reader.whole(key))
        for name, value in converter.convert(first, model=model, config=model.config).items():
            if name in targets:
                fill_local(targets[name], value[0] if isinstance(value, list) else value, held)


def _expert_range(converter, first: str, targets: dict[str, torch.Tensor], sources: list) -> tuple[int, int] | None:
    """The experts [start, stop) this rank holds of every target `converter` fills, where it stacks
    one source per expert and pattern on dim 0 (then concatenates on another dim at most); None
    where it does something else, or the rank holds its targets otherwise (whole, packed)."""
    from collections import Counter

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers.core_model_loading import Concatenate, MergeModulelist

    from distrain.parallel.tensor_parallel import is_packed

    ops = converter.operations
    if not (ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and all(isinstance(op, Concatenate) and op.dim != 0 for op in ops[1:])):
        return None
    ranges = set()
    for target in converter.target_patterns:
        held = targets.get(first.replace(converter.target_patterns[0], target))
        if not isinstance(held, DTensor) or is_packed(held):
            return None
        sizes, offsets = compute_local_shape_and_global_offset(held.shape, held.device_mesh, held.placements)
        ranges.add((offsets[0], offsets[0] + sizes[0]))
    per_pattern = set(Counter(pattern for _, pattern in sources).values())
    return ranges.pop() if len(ranges) == 1 and per_pattern == {targets[first].shape[0]} else None


def _of_experts(sources: list, held: tuple[int, int]) -> list:
    """The sources of experts held[0] <= i < held[1]: the i-th source of each pattern is expert i."""
    position: dict[str, int] = {}
    kept = []
    for key, pattern in sources:
        position[pattern] = i = position.get(pattern, -1) + 1
        if held[0] <= i < held[1]:
            kept.append((key, pattern))
    return kept


def check_keys(model: nn.Module, folder: Path) -> None:
    """Before any worker starts: every tensor of `model` (on meta is enough) has a source in the
    checkpoint's keys, or ConfigError naming what is missing."""
    from distrain.config import ConfigError

    missing = map_keys(model, folder).missing
    if missing:
        raise ConfigError(_missing_message(folder, missing))


def _missing_message(folder: Path, missing: list[str]) -> str:
    return (f"model.name_or_path={folder}: its safetensors hold no weights for {len(missing)} of the model's tensors "
            f"(e.g. {', '.join(missing[:3])}); is it a checkpoint of this architecture and size (model.config overrides)?")


def _plan(model: nn.Module, key_files: dict[str, Path]):
    """(renamed: in-memory name -> hub key, converted: first target name -> (converter,
    [(hub key, source pattern)]), missing target names), from the keys alone."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    targets = _targets(model)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    pattern_to_converter = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    # every name a checkpoint key may map to, tied ones too (not `state_dict()`: FSDP's hooks run there)
    known = dict.fromkeys([name for name, _ in model.named_parameters(remove_duplicate=False)] + list(targets), True)
    renamed, converted = {}, {}
    for key in sorted(key_files, key=_natural):
        name, pattern = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), known)
        if name not in known:
            continue  # a key the model does not hold (e.g. a tied lm_head, rotary caches)
        if pattern is None:
            renamed[name] = key
        else:
            converted.setdefault(name, (pattern_to_converter[pattern], []))[1].append((key, pattern))
    produced = set(renamed)
    for first, (converter, _) in converted.items():  # a converter fills its first target and the others beside it
        produced.update(first.replace(converter.target_patterns[0], target) for target in converter.target_patterns)
    return renamed, converted, sorted(set(targets) - produced)


def _natural(key: str) -> list:
    """Sort key of transformers' loading order: dot-separated parts, numbers as numbers (the index
    of a checkpoint lists expert 10 before expert 2)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (each tied group once) and persistent buffers, by name."""
    targets = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                targets[f"{module_name}.{name}" if module_name else name] = buffer
    return targets


@torch.no_grad()
def _fill_box(target: torch.Tensor, reader: _Reader, key: str) -> None:
    """Read only this rank's box of `key` (a plain-sharded or whole tensor); a packed TP shard is
    several boxes: read whole, sliced by DTensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from distrain.parallel.tensor_parallel import is_packed

    if not isinstance(target, DTensor):
        target.copy_(reader.whole(key))
        return
    if is_packed(target):
        fill_local(target, reader.whole(key))
        return
    sizes, offsets = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if 0 in sizes:
        return
    target.to_local().copy_(reader.box(key, offsets, sizes))


@torch.no_grad()
def fill_local(target: torch.Tensor, full: torch.Tensor, experts: tuple[int, int] | None = None) -> None:
    """Copy this rank's part of the whole tensor `full` into `target` (each rank slices its own:
    no communication); with `experts`, `full` holds only dim 0's rows [start, stop), this rank's."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if experts is not None:
        sizes, offsets = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        if tuple(full.shape) != (experts[1] - experts[0], *target.shape[1:]):
            raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} for experts {experts[0]}-{experts[1] - 1} of a parameter of shape {tuple(target.shape)}")
        target.to_local().copy_(full[(slice(None), *(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:])))])
        return
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} for a parameter of shape {tuple(target.shape)}")
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)
