"""`distrain plan`: apply the real parallelizer to the meta model in one process, and report.

A fake process group of the run's world size (rank 0) stands in for the workers, so the plan
shown is the one `parallelize` actually applies, and the bytes are those of rank 0's shards
(the largest: torch.chunk gives the first ranks the extra rows).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distrain.config.schema import JobConfig
from distrain.models import build_meta_model
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.parallelize import block_groups, parallelize


def _block_plan(model, spec, tp: int) -> list[str]:
    """The TP styles applied in every block (the model's own plan, or the structural one)."""
    from distrain.parallel.tensor_parallel import resolved_plan

    source = "the model's base_model_tp_plan" if getattr(model.config, "base_model_tp_plan", None) else "structural (no plan declared)"
    block_prefix = next(name for name, module in model.named_modules() if module is spec.blocks[0]) + "."
    styles = [f"{name.removeprefix(block_prefix)}={style}" for name, style in resolved_plan(model, spec, tp).items() if name.startswith(block_prefix)]
    return [f"tensor-parallel styles per block ({source}): " + ", ".join(styles)]


def describe_plan(job: JobConfig, dims: ParallelDims, hf_config, device_memory: float | None = None) -> tuple[str, dict[str, int]]:
    """The plan's text and rank 0's state bytes; `device_memory` (bytes): what the totals are
    set against (None: the first CUDA device's, if any)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    try:
        mesh = dims.build_mesh("cpu")
        model, spec = build_meta_model(job.model, hf_config)
        activations = activation_bytes(job, dims, spec, hf_config)
        tp_plan = _block_plan(model, spec, dims.tp) if dims.tp > 1 else []
        units = block_groups(spec, dims.fsdp_unit_mb)
        model_name = type(model).__name__  # fully_shard renames the class
        names = {module: name for name, module in model.named_modules()}
        structure = (
            f"embeddings {names[spec.embeddings]}, lm_head {names[spec.lm_head]}{' (tied)' if spec.tied_embeddings else ''}, "
            f"final norm {names.get(spec.final_norm, 'none')}; block roles: " + ", ".join(f"{n}={r}" for n, r in spec.roles.items())
        )
        # activation checkpointing and compile change no placement or byte; leave them out here
        partial = set(parallelize(model, spec, dataclasses.replace(dims, activation_checkpointing="none", compile=False), mesh, bf16=False).partial)
        rows: dict[str, tuple] = {}
        param_bytes = unsharded_bytes = 0
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            param_bytes += local.numel() * local.element_size()
            fsdp_ranks = math.prod(
                param.device_mesh.size(i) for i, (axis, p) in enumerate(zip(param.device_mesh.mesh_dim_names, param.placements))
                if p.is_shard() and axis not in ("tp", "ep")
            ) if isinstance(param, DTensor) else 1
            unsharded_bytes += local.numel() * fsdp_ranks * 4  # fp32 (the reduce dtype)
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
        f"compile={str(dims.compile).lower()} reshard_after_forward={str(dims.reshard_after_forward).lower()}"
        + (f"; FSDP units of blocks (parallel.fsdp_unit_mb={dims.fsdp_unit_mb:g}): {'+'.join(str(len(g)) for g in units)}" if dims.fsdp else ""),
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
    accumulating = job.train.global_batch_size > job.train.micro_batch_size * dims.dp
    held_gradients = unsharded_bytes if job.parallel.grad_sync == "step" and accumulating and dims.fsdp else 0
    if held_gradients:
        lines.append(f"  + {held_gradients:,d} B ({held_gradients / 2**20:.2f} MiB) of unsharded gradients between micro-batches "
                     "(parallel.grad_sync=step)")
    if device_memory is None and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(0).total_memory
    tokens = job.train.micro_batch_size * job.train.seq_len
    lines += ["", f"activations per rank (estimate: one micro-batch of {tokens} tokens in flight, plus the loss's logits, "
                  f"{activations['logits'] / 2**30:.2f} GiB):"]
    for mode in ("none", "selective", "full"):
        peak = bytes_per_rank["total"] + held_gradients + activations[mode] + activations["logits"]
        verdict = "" if device_memory is None else (" fits" if peak <= device_memory else " does NOT fit")
        chosen = "  <- parallel.activation_checkpointing" if mode == dims.activation_checkpointing else ""
        lines.append(f"  {mode:<10} {activations[mode] / 2**30:8.2f} GiB ({activations[mode]:,} B); with state {peak / 2**30:8.2f} GiB{verdict}{chosen}")
    lines.append(f"device memory: {device_memory / 2**30:.1f} GiB" if device_memory else
                 "device memory: unknown here (distrain plan --device-memory-gib 80 sets it)")
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


def activation_bytes(job: JobConfig, dims: ParallelDims, spec, hf_config) -> dict[str, int]:
    """An estimate of one rank's activation memory for one micro-batch in flight, per
    activation-checkpointing mode, plus the loss's logits (`logits`): what autograd keeps for
    backward, counted per decoder layer (b bytes per compute element; t = tp; /t where TP shards
    the features, /sp where SP shards the sequence; s = micro_batch_size x seq_len tokens):

        norms      2 s H (4 + b) / sp       RMSNorm keeps its fp32 input and its output
        attention  s H b + s (3 Hq + 3 Hkv) b / t     input; q, k, v, rotated q and k, output
        dense MLP  s H b + 4 s I b / t                input; gate, up, act(gate), product
        MoE        s H b + 8 s E + s K (2 H + 4 I_e / t_e) b   input; router logits and
                   probabilities (fp32); per routed row its input, gate_up, act, product and
                   output (t_e = t under expert-TP, 1 under EP) (+ a shared expert as a dense MLP)
        logits     s V / t (b + 4 + 4)                the logits, their fp32 copy and its gradient

    none: every layer; full: the block inputs (s H b / sp each) plus one layer recomputed;
    selective: none less what it recomputes (norms, activations)."""
    config = hf_config
    b = 2 if job.train.mixed_precision == "bf16" or (job.train.mixed_precision == "auto" and job.run.device != "cpu") else 4
    s, t = job.train.micro_batch_size * job.train.seq_len, dims.tp
    sp = t if dims.sp else 1
    hidden, layers = config.hidden_size, len(spec.blocks)
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    hq = config.num_attention_heads * head_dim
    hkv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    norms = 2 * s * hidden * (4 + b) // sp
    attention = s * hidden * b + s * (3 * hq + 3 * hkv) * b // t
    per_layer, recomputed = [], []
    for block in spec.blocks:
        moe = next((m for m in spec.moe_blocks if any(sub is m.module for sub in block.modules())), None)
        if moe is None:
            inter = getattr(config, "intermediate_size", 4 * hidden)
            mlp, acts = s * hidden * b + 4 * s * inter * b // t, 2 * s * inter * b // t
        else:
            down = moe.experts.down_proj
            inter = down.shape[1] if down.shape[2] == hidden else down.shape[2]
            te = t if dims.ep == 1 else 1
            k, e = spec.experts_per_token, spec.num_experts
            mlp = s * hidden * b + 8 * s * e + s * k * (2 * hidden + 4 * inter // te) * b
            acts = 2 * s * k * inter * b // te
            if moe.shared_expert is not None:
                shared = next(m for m in moe.shared_expert.children() if isinstance(m, torch.nn.Linear)).out_features
                mlp += s * hidden * b + 4 * s * shared * b // t
                acts += 2 * s * shared * b // t
        per_layer.append(norms + attention + mlp)
        recomputed.append(norms + acts)
    return {
        "none": sum(per_layer),
        "selective": sum(per_layer) - sum(recomputed),
        "full": layers * s * hidden * b // sp + max(per_layer),
        "logits": s * config.vocab_size // t * (b + 4 + 4),
    }
