"""Per-rank state bytes, communication bytes per step and tokens/s of each parallel layout.

    python scripts/bench/layouts.py [--steps 4] [--out results/bench] [--model qwen3_moe_debug] [--world 4]

Each layout runs under `torchrun` (this script re-launches itself as the worker) with distrain's
own Trainer, one micro-batch per rank per step (global batch = micro-batch x data-parallel ranks),
and reports from rank 0 (state bytes: the largest over the ranks):

- state_ratio: parameters + gradients + both Adam states actually held, against the ideal
  4 x full fp32 parameter bytes / (world size / dp_replicate): HSDP replicas hold copies by
  design, every other rank holds only its share. Goal: 1.000x.
- comm_ratio: bus bytes of every collective of one step (counted at the process-group level by
  `distrain.metrics.comm.CommCounter`) against the layout's minimum. Goal: <= 1.05x.
  The minimum is what any correct implementation of the layout's contract must move, whatever
  its code: parameters are held sharded except while a block computes (so every block's weights
  must arrive for its forward and, with reshard_after_forward, again for its backward), gradients
  leave each micro-batch sharded (parallel.grad_sync=micro_batch) or the step (=step), and under
  TP each rank holds only its slice of every sharded weight, so each sub-layer's partial output
  must be summed across TP in forward and its input gradient in backward (Megatron's bound for
  1-D TP). Ring algorithms reach the lower bound on bytes per rank for these sums and gathers:
  s = (k-1)/k of the payload for a group of k ranks (twice that for an all-reduce). Per rank, per
  step of m micro-batches, for dp_replicate r x dp_shard d x tp t (g = 2 all-gathers per FSDP
  unit of blocks and micro-batch with reshard_after_forward, else 1, but 1 for the last unit
  (P_last), whose backward follows its forward at once; n = m reduce-scatters, or 1 with
  grad_sync=step):
    FSDP   s_d * (m * (g * P_blocks - (g-1) P_last + P_root) + n * P)   the root gathered once
    HSDP   + 2 s_r * P / d                          all-reduce of the gradient shards, once per step
    with TP, parameters TP leaves whole are FSDP-sharded over d x t ranks: the small ones (norms,
    routers, W bytes) kept gathered from forward to backward, the larger ones of blocks (an
    attention or shared expert left whole, V bytes, V_last in the last unit) like the blocks':
           s_dt * ((m + n) * W + m * (g * V - (g-1) V_last) + n * V) (+ 2 s_r * (W + V) / (d t))
    TP     per micro-batch, with A = micro-batch x seq_len x hidden x 4 bytes:
           2 s_t * A * (4 L - 2 W_a - 2 M_e + 2)    per layer 2 sub-layers x (forward + backward)
                                                    all-reduce (or SP's all-gather + reduce-
                                                    scatter, the same bytes); embedding forward
                                                    and lm_head backward. An expert-TP MoE block
                                                    is one such sub-layer: its router and
                                                    experts share one entry and one exit. W_a:
                                                    the layers whose attention the model's plan
                                                    leaves whole (DeepSeek-V3's MLA): it sums
                                                    nothing. M_e: with EP, the MoE layers, which
                                                    stay out of TP
           + 2 s_t * A * W_a                        SP only: the whole attention's input gathered
                                                    in forward, its output's gradient in backward
           + 2 s_t * A * M_e                        no SP only: each TP rank's MoE layers run on
                                                    its slice of the sequence, the output gathered
                                                    in forward, its gradient in backward
           + s_t * A                                SP only: all-gather of the first block's grad
           + min(2 (t-1), 6 s_t) * micro-batch x seq_len x 4
                                                    vocab-parallel loss: each token's log-sum-exp
                                                    and target logit combined over TP, by one
                                                    all-gather of 2 floats per rank (distrain: one
                                                    call; the fewest bytes up to t=3) or two
                                                    all-reduces (max; sum-exp and target)
           + 2 s_t * P_partial / d                  gradients partial over TP (norms), summed on
                                                    their FSDP shards
  where P is the bytes of TP-sharded parameters one TP rank holds before FSDP (all parameters
  without TP), split into decoder blocks and the rest (root), and P_partial the bytes of
  parameters whose partial gradients are left to an explicit all-reduce over TP (none today).
    EP     experts (X bytes per EP rank: 1/ep of them) are FSDP-sharded over e = dp_shard x tp / ep
           ranks instead of d: s_e * (m * (g X - (g-1) X_last) + n X) (+ 2 s_r * X / e)
           + 2 * R * hidden * 4                     R: the routed rows this rank sends to other
                                                    ranks plus those it receives from them
                                                    (counted from the routing); each crosses
                                                    twice (out, and back), in forward and backward
           + L * E * 8 * s_ep per micro-batch       the per-expert counts exchanged per MoE layer
    MoE    + 2 s_g * L * E * 8 per micro-batch      with the aux loss on: each layer's counts per
                                                    expert all-reduced over the data-parallel ranks
  The step's one all-reduce of scalars (loss, squared gradient norm, stop signals, and the router
  counts when the aux loss is off) is left out of the minimum.
- tokens_per_s: global tokens per second of the timed steps. On a 2-core CPU box, layouts with
  more ranks than cores share them, so compare tokens/s only between layouts of one world size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

LAYOUTS = [
    # (recipe, name, world size, overrides)
    ("qwen3_moe_debug", "world 1", 1, []),
    ("qwen3_moe_debug", "dp_shard=2", 2, ["parallel.dp_shard=2"]),
    ("qwen3_moe_debug", "dp_shard=4", 4, ["parallel.dp_shard=4"]),
    ("qwen3_moe_debug", "dp_shard=2 x tp=2 (expert-TP)", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("qwen3_moe_debug", "dp_replicate=2 x dp_shard=2", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("qwen3_moe_debug", "tp=2 (expert-TP)", 2, ["parallel.tp=2"]),
    ("qwen3_moe_debug", "tp=2 sp (expert-TP)", 2, ["parallel.tp=2", "parallel.sp=true"]),
    ("qwen3_moe_debug", "dp_shard=2 x tp=2 sp", 4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true"]),
    ("qwen3_moe_debug", "ep=2", 2, ["parallel.ep=2"]),
    ("qwen3_moe_debug", "ep=4", 4, ["parallel.ep=4"]),
    ("qwen3_moe_debug", "dp_shard=4 x ep=2", 4, ["parallel.dp_shard=4", "parallel.ep=2"]),
    ("qwen3_moe_debug", "dp_replicate=2 x dp_shard=2 x ep=2", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"]),
    ("llama_debug", "world 1", 1, []),
    ("llama_debug", "dp_shard=2", 2, ["parallel.dp_shard=2"]),
    ("llama_debug", "tp=2", 2, ["parallel.tp=2"]),
    ("llama_debug", "tp=2 sp", 2, ["parallel.tp=2", "parallel.sp=true"]),
    ("llama_debug", "dp_shard=2 x tp=2", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("llama_debug", "dp_shard=2 x tp=2 sp", 4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true"]),
    ("llama_debug", "tp=4 sp", 4, ["parallel.tp=4", "parallel.sp=true", "++model.config.num_key_value_heads=4"]),
]
MICRO_BATCH = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--model", help="only this recipe's rows")
    parser.add_argument("--world", type=int, help="only layouts of this world size")
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    from _report import report

    rows = []
    for recipe, name, world, overrides in LAYOUTS:
        if (args.model and recipe != args.model) or (args.world and world != args.world):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            dp = world // _size(overrides, "parallel.tp")
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                __file__, "--worker", str(result), str(args.steps), recipe, f"run.dir={tmp}/run",
                f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={MICRO_BATCH * dp}", *overrides,
            ]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            rows.append({"model": recipe, "layout": name, **json.loads(result.read_text())})
    report("layouts", rows, args.out, {"micro_batch_per_rank": MICRO_BATCH, "steps_timed": args.steps,
                                       "goals": "state_ratio 1.000, comm_ratio <= 1.05"})


def _size(overrides: list[str], key: str) -> int:
    return next((int(o.split("=")[1]) for o in overrides if o.startswith(key + "=")), 1)


def worker(argv: list[str]) -> None:
    """One rank under torch.distributed.run: measure, rank 0 writes the row to argv[0]."""
    result, steps, recipe, overrides = Path(argv[0]), int(argv[1]), argv[2], argv[3:]
    row = measure(recipe, overrides, steps)
    if row is not None:
        result.write_text(json.dumps(row))
    sys.stdout.flush()
    os._exit(0)  # gloo sometimes aborts in its destructors at interpreter exit (ENV.md)


@contextlib.contextmanager
def trainer_in_own_group(recipe: str, overrides: list[str]):
    """A `Trainer` of the recipe with the overrides, on every rank of the job, in a process group
    set up here and torn down after (also used by tests/rank_jobs.py)."""
    import torch.distributed as dist
    from distrain.config import load_job
    from distrain.launch.worker import init_distributed, resolve_device
    from distrain.train.trainer import Trainer

    job = load_job(recipe, ["eval.interval=0", "logging.wandb.mode=disabled", *overrides])
    device = resolve_device(job)
    init_distributed(job, device)
    try:
        Path(job.run.dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(job, device)
        try:
            yield trainer
        finally:
            if trainer.metrics is not None:
                trainer.metrics.close()
    finally:
        dist.destroy_process_group()


def measure(recipe: str, overrides: list[str], steps: int) -> dict | None:
    """On every rank of the job: the state bytes and one step's counted communication, then
    `steps` timed steps. Rank 0 returns the row."""
    import torch
    import torch.distributed as dist
    from distrain.metrics.comm import CommCounter

    with trainer_in_own_group(recipe, overrides) as trainer:
        job, model, dims = trainer.job, trainer.model, trainer.dims
        trainer.train_step(trainer.train_loader.next_batch())  # warm-up; records this rank's state bytes
        dispatchers = [m.experts._distrain_dispatcher for m in trainer.spec.moe_blocks if getattr(m.experts, "_distrain_dispatcher", None)]
        for dispatcher in dispatchers:
            dispatcher.remote_rows = 0
        comm = CommCounter()
        with comm:
            trainer.train_step(trainer.train_loader.next_batch())
        remote_rows = sum(d.remote_rows for d in dispatchers)  # routed to other ranks in the counted step
        state_bytes = sum(trainer.state_bytes.values())
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(trainer.train_loader.next_batch())
        elapsed = time.perf_counter() - start

        held = torch.tensor([state_bytes], dtype=torch.float64)
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        measured_bus = sum(comm.bus.values())
        minimum = analytic_bus_bytes(trainer, job, remote_rows)
        exchange = expert_exchange_bytes(trainer, job, remote_rows)
        if dist.get_rank() != 0:
            return None
        ideal = 4 * full_bytes / (dims.world_size // dims.dp_replicate)
        return {
            "world": dims.world_size,
            "state_MiB": held.item() / 2**20,
            "ideal_MiB": ideal / 2**20,
            "state_ratio": held.item() / ideal,
            "comm_MiB": measured_bus / 2**20,
            "min_comm_MiB": minimum / 2**20,
            "comm_ratio": measured_bus / minimum if minimum else 1.0,
            # EP: the all-to-alls' bytes against their share of the minimum (rows and counts)
            "all_to_all_ratio": comm.bus.get("all_to_all", 0.0) / exchange if exchange else None,
            "comm_by_kind_MiB": {k: round(v / 2**20, 4) for k, v in sorted(comm.bus.items())},
            "comm_calls": dict(sorted(comm.calls.items())),
            "comm_bus_bytes": dict(sorted(comm.bus.items())),
            "tokens_per_s": steps * job.train.global_batch_size * job.train.seq_len / elapsed,
            "uncounted_ops": sorted(comm.unknown),
        }


def _tp_sharded(param) -> bool:
    from torch.distributed.tensor import DTensor

    names = param.device_mesh.mesh_dim_names or () if isinstance(param, DTensor) else ()
    return "tp" in names and not param.placements[names.index("tp")].is_replicate()


def analytic_bus_bytes(trainer, job, remote_rows: int) -> float:
    """The layout's minimum bus bytes for one step (see the module docstring)."""
    dims, model, spec = trainer.dims, trainer.model, trainer.spec
    d, r, t = dims.dp_shard, dims.dp_replicate, dims.tp
    block_prefix = next(n for n, m in model.named_modules() if m is spec.blocks) + "."
    partial, experts = set(trainer.tp_grads.partial), set(spec.expert_param_names) if dims.ep > 1 else set()
    from distrain.parallel.parallelize import block_groups, stays_gathered

    last_unit = block_groups(spec, dims.fsdp_unit_mb)[-1]
    last_prefixes = tuple(f"{block_prefix}{len(spec.blocks) - len(last_unit) + i}." for i in range(len(last_unit)))
    p_blocks = p_root = p_whole = p_partial = p_experts = p_large = last_large = 0.0
    last_blocks = last_experts = 0.0  # the last FSDP unit's bytes: gathered once (never resharded after forward)
    for name, param in model.named_parameters():
        tp_sharded = _tp_sharded(param)
        nbytes = param.numel() * param.element_size() / (t if tp_sharded else 1)
        if name in experts:
            p_experts += nbytes / dims.ep
            last_experts += nbytes / dims.ep if name.startswith(last_prefixes) else 0.0
        elif t > 1 and not tp_sharded:
            if name.startswith(block_prefix) and not stays_gathered(model.get_submodule(name.rsplit(".", 1)[0]), spec):
                p_large += nbytes
                last_large += nbytes if name.startswith(last_prefixes) else 0.0
            else:
                p_whole += nbytes
        elif name.startswith(block_prefix):
            p_blocks += nbytes
            last_blocks += nbytes if name.startswith(last_prefixes) else 0.0
        else:
            p_root += nbytes
        if name in partial:
            p_partial += nbytes
    share = lambda k: (k - 1) / k  # noqa: E731
    config, micro, seq = model.config, job.train.micro_batch_size, job.train.seq_len
    num_micro = job.train.global_batch_size // (micro * dims.dp)
    reductions = 1 if job.parallel.grad_sync == "step" else num_micro  # reduce-scatters per step
    gathers = 2 if dims.reshard_after_forward else 1  # each block's all-gathers per micro-batch
    total = share(d) * (num_micro * (gathers * p_blocks - (gathers - 1) * last_blocks + p_root) + reductions * (p_blocks + p_root))
    total += 2 * share(r) * (p_blocks + p_root) / d
    total += share(d * t) * ((num_micro + reductions) * p_whole + num_micro * (gathers * p_large - (gathers - 1) * last_large) + reductions * p_large)
    total += 2 * share(r) * (p_whole + p_large) / (d * t)
    if t > 1:
        activation = micro * seq * config.hidden_size * 4
        # attention left whole by the model's plan (DeepSeek-V3's MLA: no parameter of it sharded
        # over TP) sums nothing over TP; under SP its input is gathered in forward and its output's
        # gradient in backward
        whole = sum(not any(_tp_sharded(p) for p in block.get_submodule(child).parameters())
                    for block in spec.blocks for child, role in spec.roles.items() if role == "attention")
        # with EP the MoE blocks stay out of TP: without SP each runs on its slice of the sequence
        # (the output gathered in forward, the output's gradient in backward), with SP on its own
        outside = len(spec.moe_blocks) if dims.ep > 1 else 0
        per_micro = 2 * share(t) * activation * (4 * config.num_hidden_layers - 2 * whole - 2 * outside + 2)
        per_micro += 2 * share(t) * activation * (whole if dims.sp else outside)
        per_micro += share(t) * activation if dims.sp else 0
        # the loss: the cheaper of one all-gather of 2 floats per token and two all-reduces of 3
        per_micro += min((t - 1) * 2, 2 * share(t) * 3) * micro * seq * 4
        total += num_micro * per_micro + 2 * share(t) * p_partial / d
    layers, num_experts = len(spec.moe_blocks), spec.num_experts
    if dims.ep > 1:
        e = dims.efsdp
        total += share(e) * (num_micro * (gathers * p_experts - (gathers - 1) * last_experts) + reductions * p_experts)
        total += 2 * share(r) * p_experts / e
        total += expert_exchange_bytes(trainer, job, remote_rows)
    if layers and trainer.router_stats.coef > 0:  # else they ride on the step's one scalar all-reduce
        stats_ranks = dims.world_size if (t > 1 and dims.ep > 1) else dims.dp
        total += num_micro * 2 * share(stats_ranks) * layers * num_experts * 8
    return total


def expert_exchange_bytes(trainer, job, remote_rows: int) -> float:
    """EP's all-to-all minimum for one step: the routed rows that cross ranks, out and back, in
    forward and backward, and each MoE layer's per-expert counts once per micro-batch (however
    many pieces the rows travel in: a piece's counts follow from the totals)."""
    dims = trainer.dims
    if dims.ep == 1:
        return 0.0
    num_micro = job.train.global_batch_size // (job.train.micro_batch_size * dims.dp)
    counts = num_micro * len(trainer.spec.moe_blocks) * trainer.spec.num_experts * 8 * (dims.ep - 1) / dims.ep
    return 2 * remote_rows * trainer.model.config.hidden_size * 4 + counts


if __name__ == "__main__":
    main()
