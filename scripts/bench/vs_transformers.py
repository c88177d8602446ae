"""distrain against transformers' own distributed training, side by side, on every layout both have.

    pip install -e '.[bench]'      # accelerate: transformers' distributed loading needs it
    python scripts/bench/vs_transformers.py [--rounds 3] [--steps 20] [--layouts fsdp4,tp2_fsdp2] [--out results/bench]
    python scripts/bench/vs_transformers.py --device cuda --size 1b --layouts single --steps 15   # one GPU: tokens/s, MFU

The peer is what a transformers user would write: `from_pretrained(..., distributed_config=
DistributedConfig(...))` (transformers' FSDP2 / TP / EP, its own plans), then a plain loop:
forward with `labels` (the model shifts them and takes the mean), backward, AdamW (foreach), at
world size 1 without `distributed_config` (the plain PyTorch loop). distrain runs its own `Trainer`
step (`Trainer.train_step`: forward, backward, gradient norm, the ranks' agreement, AdamW, the
schedule) on the same layout.

Both start from one model saved once (`--size tiny`: a Qwen3-MoE with vocab 512, hidden 128, 4
layers, 8 experts top-2; `--size 1b`: hidden 1024, 16 layers, 32 experts top-4, ~0.95B parameters;
the router's aux loss off), take the same global batch (4 x 128 random tokens, 8 x 2048 for 1b;
each data-parallel rank its slice), fp32 on the CPU (bf16 autocast with fp32 weights on CUDA), AdamW(lr 1e-3, betas (0.9, 0.999), weight decay 0.01, constant lr),
no clipping (distrain still computes the norm). Each run is its own `torchrun` job; a round runs
every layout once for each system, in alternating order, so that the box's noise hits both alike.
Rows `*_sp` and `*_unit_per_block` are distrain variants (sequence parallelism; one FSDP unit per
block, as transformers has) set against the same transformers runs. Reported: the median over rounds of each run's median step time (steps 4..steps), tokens/s, the
ratio distrain / transformers in tokens/s, rank 0's collectives and bus bytes in one step
(transformers / distrain, counted by `distrain.metrics.comm.CommCounter`), and the first steps'
losses of both (they must agree: the same model, data and update).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# size -> (model config, global batch, sequence length)
SIZES = {
    "tiny": (dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
    ), 4, 128),
    # qwen3_moe_debug scaled to ~0.95B parameters (~0.2B active): for one GPU, bf16
    "1b": (dict(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
    ), 8, 2048),
}
COMMON = dict(max_position_embeddings=4096, tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.0)
# name -> (world size, distrain overrides, transformers DistributedConfig kwargs; None: no distributed_config)
LAYOUTS = {
    "single": (1, [], None),
    "fsdp4": (4, ["parallel.dp_shard=4"], dict(fsdp_size=4)),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], dict(dp_replicate_size=2, fsdp_size=2)),
    "tp2_fsdp2": (4, ["parallel.dp_shard=2", "parallel.tp=2"], dict(tp_size=2, fsdp_size=2)),
    "tp2_fsdp2_sp": (4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true"], dict(tp_size=2, fsdp_size=2)),
    "fsdp4_ep2": (4, ["parallel.dp_shard=4", "parallel.ep=2"], dict(fsdp_size=4, ep_size=2)),
    "fsdp4_ep4": (4, ["parallel.dp_shard=4", "parallel.ep=4"], dict(fsdp_size=4, ep_size=4)),
    # distrain with one FSDP unit per block, as transformers has: what the grouping of blocks gives
    "fsdp4_unit_per_block": (4, ["parallel.dp_shard=4", "parallel.fsdp_unit_mb=0"], dict(fsdp_size=4)),
    "tp2_fsdp2_unit_per_block": (4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.fsdp_unit_mb=0"], dict(tp_size=2, fsdp_size=2)),
}
# variants of distrain's side compare with the transformers runs of the layout named here
PEER = {"tp2_fsdp2_sp": "tp2_fsdp2", "fsdp4_unit_per_block": "fsdp4", "tp2_fsdp2_unit_per_block": "tp2_fsdp2"}
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 0.01


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="tiny: the CPU comparison; 1b: a ~1B-parameter MoE for one GPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 autocast / FSDP bf16 on both sides, NCCL")
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "ARGS_JSON", "RESULT"))
    args = parser.parse_args()
    if args.worker:
        system, spec, result = args.worker
        row = (distrain_worker if system == "distrain" else transformers_worker)(**json.loads(spec))
        if row is not None:
            Path(result).write_text(json.dumps(row))
        sys.stdout.flush()
        os._exit(0)  # gloo sometimes aborts in its destructors at interpreter exit (ENV.md)
    from _report import report

    names = args.layouts.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, args.size)
        for round_ in range(args.rounds):
            for name in names:
                systems = ("distrain", "transformers") if round_ % 2 == 0 else ("transformers", "distrain")
                for system in systems:
                    if system == "transformers" and PEER.get(name) in names:
                        continue  # measured once, under the layout it is the peer of
                    runs.setdefault((name, system), []).append(launch(system, name, model_dir, Path(tmp), args))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    _, global_batch, seq_len = SIZES[args.size]
    rows = []
    for name in names:
        peer = PEER.get(name) if PEER.get(name) in names else name
        ours, theirs = runs[(name, "distrain")], runs[(peer, "transformers")]
        step = {"distrain": statistics.median(r["median_step_s"] for r in ours),
                "transformers": statistics.median(r["median_step_s"] for r in theirs)}
        rows.append({
            "layout": name,
            "world": LAYOUTS[name][0],
            "distrain_overrides": " ".join(LAYOUTS[name][1]),
            "transformers_step_s": step["transformers"],
            "distrain_step_s": step["distrain"],
            "transformers_tokens_per_s": global_batch * seq_len / step["transformers"],
            "distrain_tokens_per_s": global_batch * seq_len / step["distrain"],
            "ratio": step["transformers"] / step["distrain"],
            # the same FLOPs per token (distrain's count) and peak for both; None on CPU
            **({f"{k}_mfu": global_batch * seq_len / step[k] / LAYOUTS[name][0] * ours[0]["flops_per_token"] / ours[0]["peak_flops"]
                for k in step} if ours[0].get("peak_flops") else {}),
            "collectives_per_step": f"{theirs[0]['collectives']} / {ours[0]['collectives']}",
            "comm_MiB_per_step": f"{theirs[0]['comm_MiB']:.2f} / {ours[0]['comm_MiB']:.2f}",
            "loss_1_to_3": " / ".join(f"{a:.4f}|{b:.4f}" for a, b in zip(ours[0]["losses"][:3], theirs[0]["losses"][:3])),
            "max_loss_diff_20": max(abs(a - b) for a, b in zip(ours[0]["losses"], theirs[0]["losses"])),
            "rounds_ratio": [round(t["median_step_s"] / d["median_step_s"], 3) for d, t in zip(ours, theirs)],
        })
    report("vs_transformers", rows, args.out, {
        "model": {**SIZES[args.size][0], **COMMON}, "global_batch": [global_batch, seq_len], "steps": args.steps, "rounds": args.rounds,
        "device": args.device,
        "ratio": "distrain tokens/s over transformers tokens/s (median over rounds of each run's median step, steps 4..)",
        "goal": ">= 1.3 on every layout",
    })


def make_model(folder: Path, size: str) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**SIZES[size][0], **COMMON)).save_pretrained(folder)


def launch(system: str, name: str, model_dir: Path, tmp: Path, args) -> dict:
    world = LAYOUTS[name][0]
    result = tmp / f"{system}-{name}-{time.monotonic_ns()}.json"
    spec = json.dumps({"layout": name, "model_dir": str(model_dir), "steps": args.steps, "tmp": str(tmp), "size": args.size, "device": args.device})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", system, spec, str(result)]
    threads = str(max(1, (os.cpu_count() or 1) // world))
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"{system} {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def global_batch(size: str):
    """The same global batch every step (the loss falls: the updates are compared too)."""
    import torch

    config, batch, seq_len = SIZES[size]
    return torch.randint(0, config["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(1234))


def timed_steps(step, steps: int) -> dict:
    """Run `steps` steps; the second one under distrain's collective counter (exact calls and bus
    bytes per step, on this rank), outside the steps whose times count (4..)."""
    import contextlib

    from distrain.metrics.comm import CommCounter

    losses, times, comm = [], [], CommCounter()
    for i in range(steps):
        with comm if i == 1 else contextlib.nullcontext():
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
    return {"losses": losses, "median_step_s": statistics.median(times[3:]), "step_s": times,
            "collectives": sum(comm.calls.values()), "comm_MiB": sum(comm.bus.values()) / 2**20, "calls": dict(comm.calls)}


def distrain_worker(layout: str, model_dir: str, steps: int, tmp: str, size: str, device: str) -> dict | None:
    import torch
    import torch.distributed as dist
    from layouts import trainer_in_own_group

    from distrain.data.packing import IGNORE_INDEX

    world, overrides, _ = LAYOUTS[layout]
    _, batch_size, seq_len = SIZES[size]
    dp = world // (2 if "parallel.tp=2" in overrides else 1)
    overrides = [
        "model=pretrained", f"model.name_or_path={model_dir}", "data.vocab_size=512", "data.max_bytes=300000",
        f"data.cache_dir={tmp}/cache", f"run.dir={tmp}/run-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}-{time.monotonic_ns()}",
        f"train.seq_len={seq_len}", f"train.global_batch_size={batch_size}", f"train.micro_batch_size={batch_size // dp}",
        f"run.device={device}", f"train.mixed_precision={'bf16' if device == 'cuda' else 'fp32'}", "logging.peak_flops=null",
        "train.grad_clip=0", f"optim.lr={LR}", f"optim.beta1={BETAS[0]}", f"optim.beta2={BETAS[1]}",
        f"optim.weight_decay={WEIGHT_DECAY}", "optim.decay_norms_and_biases=true", "optim.schedule=constant", "optim.warmup_steps=0", "moe.aux_loss_coef=0",
        "checkpoint.export=false", f"launcher.nproc_per_node={world}", *overrides,
    ]
    with trainer_in_own_group("qwen3_moe_debug", overrides) as trainer:
        ids = global_batch(size)
        per_rank = batch_size // trainer.dp_size
        mine = ids[trainer.dp_rank * per_rank:(trainer.dp_rank + 1) * per_rank]
        labels = torch.cat([mine[:, 1:], torch.full((per_rank, 1), IGNORE_INDEX)], dim=1)
        batch = {"input_ids": mine, "position_ids": torch.arange(seq_len).expand(per_rank, -1), "labels": labels,
                 "global_targets": torch.tensor(batch_size * (seq_len - 1))}  # as distrain's loader counts them

        def step() -> float:
            loss = trainer.train_step([batch])[0]
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            return loss

        row = timed_steps(step, steps)
        row.update(flops_per_token=trainer.flops_per_token, peak_flops=trainer.peak_flops)
        return row if dist.get_rank() == 0 else None


def transformers_worker(layout: str, model_dir: str, steps: int, tmp: str, size: str, device: str) -> dict | None:
    import contextlib

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    world, _, config = LAYOUTS[layout]
    _, batch_size, _ = SIZES[size]
    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if config is not None:
        dist.init_process_group("nccl" if cuda else "gloo")
        kwargs["distributed_config"] = DistributedConfig(**config, fsdp_mixed_precision=cuda)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cuda and config is None:
        model = model.cuda()
    model.train()
    # bf16 compute with fp32 weights, as distrain's train.mixed_precision=bf16 (FSDP's policy when sharded)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config is None else contextlib.nullcontext()
    dp_rank, dp_size = (0, 1) if config is None else (lambda m: (m.get_local_rank(), m.size()))(model._mesh_manager.get_mesh("fsdp"))
    if config is not None and config.get("dp_replicate_size", 1) > 1:
        replicate = model._mesh_manager.get_mesh("dp_replicate")
        dp_rank, dp_size = replicate.get_local_rank() * dp_size + dp_rank, dp_size * replicate.size()
    per_rank = batch_size // dp_size
    ids = global_batch(size)[dp_rank * per_rank:(dp_rank + 1) * per_rank].to("cuda" if cuda else "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, foreach=True)

    def step() -> float:
        # equal target counts on every rank: the mean per rank, averaged over the data-parallel
        # ranks by FSDP, is the global batch's mean
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # (a host sync, as distrain's step has)

    row = timed_steps(step, steps)
    if config is None:
        return row
    # the global mean (outside the timed steps): ranks of one TP group hold the same value
    losses = torch.tensor(row["losses"], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(losses)
    row["losses"] = (losses / world).tolist()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return row if rank == 0 else None


if __name__ == "__main__":
    main()
