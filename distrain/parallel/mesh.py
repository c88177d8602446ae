"""Parallel sizes -> validated `ParallelDims` -> a `DeviceMesh` with named axes.

Axes: `dp_replicate` (HSDP replicas) x `dp_shard` (FSDP) x `tp` (TP and SP). Validation runs
before any process group exists, so a bad layout fails with exit 2 before a worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from distrain.config.schema import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: bool
    ep: int
    world_size: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int, hf_config=None, seq_len: int | None = None) -> "ParallelDims":
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
        if cfg.tp > 1 or cfg.sp:
            raise ConfigError(
                f"parallel.tp={cfg.tp} parallel.sp={cfg.sp}: tensor and sequence parallelism are not implemented "
                "yet; use parallel.tp=1 parallel.sp=false"
            )
        if cfg.ep > 1:
            raise ConfigError(f"parallel.ep={cfg.ep}: expert parallelism is not implemented yet; use parallel.ep=1")
        return cls(cfg.dp_replicate, dp_shard, cfg.tp, cfg.sp, cfg.ep, world_size)

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp")
        )
