"""Parallel sizes -> validated `ParallelDims` -> a `DeviceMesh` with named axes.

Axes: `dp_replicate` (HSDP replicas) x `dp_shard` (FSDP) x `tp` (TP and SP). Expert parallelism
draws its `ep` ranks from `dp_shard x tp` (consecutive ranks); the experts are FSDP-sharded over
the rest of those, `efsdp = dp_shard x tp / ep`, and over `dp_replicate` as HSDP. Every view of
the mesh is built here, in `ParallelDims.views`. Validation runs before any process group
exists, so a bad layout fails with exit 2 before a worker starts.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any

from distrain.config.schema import ConfigError, ParallelConfig, TrainConfig


@dataclass(frozen=True)
class MeshViews:
    """The meshes each part of the parallelizer and trainer uses, all views of one world mesh."""

    world: Any  # (dp_replicate, dp_shard, tp)
    dp: Any  # FSDP's: (dp_replicate, dp_shard) for HSDP, else dp_shard
    dp_flat: Any  # every data-parallel rank, 1-D: batches, loss and token sums
    tp: Any
    dp_shard_tp: Any = None  # with TP: FSDP of what TP leaves whole, (dp_replicate, dp_shard x tp)
    ep: Any = None  # with EP: the ranks that split the experts
    efsdp: Any = None  # with EP: the experts' FSDP mesh, (dp_replicate, efsdp)


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: bool
    ep: int
    world_size: int
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: str = "none"
    compile: bool = False
    fsdp_unit_mb: float = 0.0

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        return self.dp_shard * self.tp // self.ep

    @property
    def fsdp(self) -> bool:
        # with TP, FSDP also shards the parameters TP leaves whole over the TP ranks
        return self.dp > 1 or self.tp > 1 or self.cpu_offload

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int, hf_config=None, train: TrainConfig | None = None) -> "ParallelDims":
        cfg.validate()
        fixed = cfg.dp_replicate * cfg.tp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"parallel.dp_replicate={cfg.dp_replicate} x parallel.tp={cfg.tp} = {fixed} does not divide "
                    f"the world size {world_size}; e.g. parallel.tp=1 parallel.dp_replicate=1"
                )
            dp_shard = world_size // fixed
        if dp_shard * fixed != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={cfg.dp_replicate} x parallel.dp_shard={dp_shard} x parallel.tp={cfg.tp} "
                f"= {dp_shard * fixed} differs from the world size {world_size}; e.g. parallel.dp_shard=-1 fills the rest"
            )
        if hf_config is not None:
            _check_model_fits(cfg, hf_config, train.seq_len if train else None)
        dp = cfg.dp_replicate * dp_shard
        if train is not None and train.global_batch_size % (train.micro_batch_size * dp):
            unit = train.micro_batch_size * dp
            fixes = [f"train.global_batch_size={unit * max(1, -(-train.global_batch_size // unit))}"]  # the next multiple up
            micro = next((m for m in range(train.micro_batch_size, 0, -1) if train.global_batch_size % (m * dp) == 0), None)
            if micro is not None:
                fixes.append(f"train.micro_batch_size={micro}")
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size="
                f"{train.micro_batch_size} x data-parallel ranks {dp} (dp_replicate x dp_shard); e.g. {' or '.join(fixes)}"
            )
        if cfg.sp and cfg.tp == 1:
            raise ConfigError("parallel.sp=true shards the sequence over the TP ranks and needs parallel.tp>1; e.g. parallel.tp=2")
        return cls(
            cfg.dp_replicate, dp_shard, cfg.tp, cfg.sp, cfg.ep, world_size,
            cfg.reshard_after_forward, cfg.cpu_offload, cfg.activation_checkpointing, cfg.compile, cfg.fsdp_unit_mb,
        )

    def describe(self) -> str:
        """The mesh and what each axis does, in one line."""
        parts = []
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate={self.dp_replicate} (replicas; gradients all-reduced)")
        if self.dp_shard > 1:
            parts.append(f"dp_shard={self.dp_shard} (FSDP: parameters, gradients, optimizer state sharded)")
        if self.tp > 1:
            parts.append(f"tp={self.tp} (tensor parallel{', sequence parallel' if self.sp else ''})")
        if self.ep > 1:
            parts.append(f"ep={self.ep} (experts split, all-to-all dispatch; expert FSDP over {self.efsdp})")
        extras = [name for name, on in (("CPU offload", self.cpu_offload), (f"{self.activation_checkpointing} activation checkpointing",
                                                                          self.activation_checkpointing != "none"), ("compiled blocks", self.compile)) if on]
        return " x ".join(parts or ["one process, no sharding"]) + (f"; {', '.join(extras)}" if extras else "")

    def check_experts(self, num_experts: int) -> None:
        """EP against the experts the model discovery found (`ModelSpec.num_experts`; 0: dense)."""
        if self.ep == 1:
            return
        if not num_experts:
            raise ConfigError(f"parallel.ep={self.ep} but the model has no experts; use parallel.ep=1")
        shard_tp = self.dp_shard * self.tp
        if num_experts % self.ep or shard_tp % self.ep:
            working = max(d for d in _divisors(num_experts, shard_tp) if shard_tp % d == 0)
            raise ConfigError(
                f"parallel.ep={self.ep} must divide the model's {num_experts} experts and parallel.dp_shard x "
                f"parallel.tp = {self.dp_shard} x {self.tp} = {shard_tp}; e.g. parallel.ep={working}"
            )

    def build_mesh(self, device_type: str) -> MeshViews:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        world = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
        )
        hsdp = self.dp_replicate > 1
        views = dict(world=world, dp=world["dp_replicate", "dp_shard"] if hsdp else world["dp_shard"],
                     dp_flat=world["dp_replicate", "dp_shard"]._flatten("dp"), tp=world["tp"])
        if self.tp == 1 and self.ep == 1:
            return MeshViews(**views)
        shard_tp = world["dp_shard", "tp"]._flatten("dp_shard_tp")
        if self.tp > 1:
            views["dp_shard_tp"] = world["dp_replicate", "dp_shard_tp"] if hsdp else world["dp_shard_tp"]
        if self.ep > 1:
            # NOTE: ep is the inner (consecutive) part of dp_shard x tp, efsdp the outer
            split = shard_tp._unflatten(0, (self.efsdp, self.ep), ("efsdp", "ep"))
            views["ep"] = split["ep"]
            views["efsdp"] = DeviceMesh._concatenate([world["dp_replicate"], split["efsdp"]]) if hsdp else split["efsdp"]
        return MeshViews(**views)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _attention_sharded(hf_config) -> bool:
    """Whether TP splits the attention heads: a declared plan that shards an attention projection,
    or none declared (the structural plan shards q, k and v). A plan that shards none (DeepSeek-V3's
    MLA) leaves attention whole on every TP rank, whatever its head counts
    (`tensor_parallel._whole_attention`)."""
    plan = getattr(hf_config, "base_model_tp_plan", None)
    return not plan or any(style.startswith("colwise") and re.search(r"attn|attention", key) for key, style in plan.items())


def _check_model_fits(cfg: ParallelConfig, hf_config, seq_len: int | None) -> None:
    tp = cfg.tp
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    for name, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % tp and _attention_sharded(hf_config):
            working = max(d for d in _divisors(heads, tp) if kv_heads % d == 0)
            raise ConfigError(
                f"parallel.tp={tp} does not divide the model's {count} {name} "
                f"(num_attention_heads={heads}, num_key_value_heads={kv_heads}); e.g. parallel.tp={working}"
            )
    if tp > 1 and hf_config.vocab_size % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide model.config.vocab_size={hf_config.vocab_size} (the embedding and "
            f"lm_head are sharded on it); pad the vocabulary to a multiple of {tp}, e.g. "
            f"model.config.vocab_size={-(-hf_config.vocab_size // tp) * tp}"
        )
    if (cfg.sp or cfg.ep > 1) and seq_len is not None and seq_len % tp:
        raise ConfigError(
            f"{'parallel.sp=true' if cfg.sp else 'parallel.ep>1 (MoE layers run on sequence slices)'} shards the sequence over "
            f"parallel.tp={tp}, which does not divide train.seq_len={seq_len}; e.g. train.seq_len={-(-seq_len // tp) * tp}"
        )
