"""`distrain plan`: apply the real parallelizer to the meta model in one process, and report.

A fake process group of the run's world size (rank 0) stands in for the workers, so the plan
shown is the one `parallelize` actually applies, and the bytes are those of rank 0's shards
(the largest: torch.chunk gives the first ranks the extra rows).
"""

from __future__ import annotations

import dataclasses
import re

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distrain.config.schema import JobConfig
from distrain.models import build_meta_model
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.parallelize import parallelize


def _block_plan(model, spec, tp: int) -> list[str]:
    """The TP styles applied in every block (the model's own plan, or the structural one)."""
    from distrain.parallel.tensor_parallel import resolved_plan

    source = "the model's base_model_tp_plan" if getattr(model.config, "base_model_tp_plan", None) else "structural (no plan declared)"
    block_prefix = next(name for name, module in model.named_modules() if module is spec.blocks[0]) + "."
    styles = [f"{name.removeprefix(block_prefix)}={style}" for name, style in resolved_plan(model, spec, tp).items() if name.startswith(block_prefix)]
    return [f"tensor-parallel styles per block ({source}): " + ", ".join(styles)]


def describe_plan(job: JobConfig, dims: ParallelDims, hf_config) -> tuple[str, dict[str, int]]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    try:
        mesh = dims.build_mesh("cpu")
        model, spec = build_meta_model(job.model, hf_config)
        tp_plan = _block_plan(model, spec, dims.tp) if dims.tp > 1 else []
        model_name = type(model).__name__  # fully_shard renames the class
        names = {module: name for name, module in model.named_modules()}
        structure = (
            f"embeddings {names[spec.embeddings]}, lm_head {names[spec.lm_head]}{' (tied)' if spec.tied_embeddings else ''}, "
            f"final norm {names.get(spec.final_norm, 'none')}; block roles: " + ", ".join(f"{n}={r}" for n, r in spec.roles.items())
        )
        # activation checkpointing and compile change no placement or byte; leave them out here
        partial = set(parallelize(model, spec, dataclasses.replace(dims, activation_checkpointing="none", compile=False), mesh, bf16=False))
        rows: dict[str, tuple] = {}
        param_bytes = 0
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            param_bytes += local.numel() * local.element_size()
            layout = ", ".join(
                f"{axis}: {placement}" for axis, placement in zip(param.device_mesh.mesh_dim_names, param.placements)
            ) if isinstance(param, DTensor) else "replicated"
            if name in partial:
                layout += "; gradient summed over tp"
            rows.setdefault(re.sub(r"\.\d+\.", ".*.", name), (tuple(param.shape), tuple(local.shape), layout))
    finally:
        dist.destroy_process_group()

    bytes_per_rank = {"parameters": param_bytes, "gradients": param_bytes, "optimizer": 2 * param_bytes}
    bytes_per_rank["total"] = sum(bytes_per_rank.values())
    num_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"world size {dims.world_size}: dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp} "
        f"sp={str(dims.sp).lower()} ep={dims.ep}; activation_checkpointing={dims.activation_checkpointing} "
        f"compile={str(dims.compile).lower()} reshard_after_forward={str(dims.reshard_after_forward).lower()}",
        f"model {model_name}: {num_params:,} parameters, {len(spec.blocks)} x {spec.block_class}"
        + (f", {spec.num_experts} experts (top-{spec.experts_per_token})" if spec.num_experts else ""),
        structure,
        *tp_plan,
        *_ep_plan(dims, spec),
        "",
        "parameter (rank 0)  full shape -> local shape  placement",
    ]
    width = max(len(n) for n in rows)
    for name, (full, local, layout) in rows.items():
        lines.append(f"  {name:<{width}}  {list(full)} -> {list(local)}  {layout}")
    lines += ["", "per-rank bytes (rank 0; fp32 weights, fp32 gradients, Adam exp_avg + exp_avg_sq):"]
    for key, value in bytes_per_rank.items():
        lines.append(f"  {key:<11} {value:>14,d} B  {value / 2**20:10.2f} MiB")
    return "\n".join(lines), bytes_per_rank


def _ep_plan(dims: ParallelDims, spec) -> list[str]:
    """Which experts each rank holds under expert parallelism."""
    if dims.ep == 1 or not spec.num_experts:
        return []
    per_rank = spec.num_experts // dims.ep
    groups = dims.world_size // dims.ep
    held = ", ".join(f"{r}: {r * per_rank}-{(r + 1) * per_rank - 1}" for r in range(dims.ep))
    return [
        f"expert parallelism: {groups} group(s) of {dims.ep} consecutive ranks of dp_shard x tp; in each, EP rank r holds "
        f"experts {held} of every MoE layer ({per_rank} of {spec.num_experts}), FSDP-sharded over {dims.efsdp} rank(s)"
        + (f" and replicated over dp_replicate={dims.dp_replicate}" if dims.dp_replicate > 1 else "")
        + "; routed token rows travel by all-to-all within the group"
    ]
