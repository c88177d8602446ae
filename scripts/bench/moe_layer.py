"""The MoE layer's forward + backward tokens/s: distrain's experts (torch path) against
transformers' `grouped_mm` experts and its eager loop, on the same Qwen3-MoE block, weights and
inputs.

    python scripts/bench/moe_layer.py [--rounds 5] [--device cpu] [--dtype float32]

Shapes: Qwen3-30B-A3B's routing (128 experts, top-8) with the widths scaled down (H=256, I=96)
at T=4096 tokens, and a small one (16 experts, top-2, H=128, I=64, T=512). Each round times every
implementation once (median of `--iters` fwd+bwd passes), in alternating order; the table gives
median tokens/s over rounds and the ratio to transformers' `grouped_mm`, and each output's largest
difference from the eager loop's. Goal: >= 1.0x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import report  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b-like": dict(tokens=4096, num_experts=128, num_experts_per_tok=8, hidden_size=256, moe_intermediate_size=96),
    "small": dict(tokens=512, num_experts=16, num_experts_per_tok=2, hidden_size=128, moe_intermediate_size=64),
}
IMPLEMENTATIONS = ("distrain", "grouped_mm", "eager")


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distrain.models import discover_spec
    from distrain.moe import experts

    experts.register()
    sizes = {k: v for k, v in shape.items() if k != "tokens"}
    config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager", dtype=dtype).to(device)
    return model, discover_spec(model).moe_blocks[0].module


def fwd_bwd_seconds(model, block, implementation: str, x: torch.Tensor, iters: int) -> float:
    model.config._experts_implementation = implementation
    times = []
    for _ in range(iters + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for shape_name, shape in SHAPES.items():
        model, block = build(shape, device, dtype)
        x = torch.randn(1, shape["tokens"], shape["hidden_size"], device=device, dtype=dtype, requires_grad=True)
        outputs = {}
        with torch.no_grad():
            for name in IMPLEMENTATIONS:
                model.config._experts_implementation = name
                out = block(x)
                outputs[name] = (out[0] if isinstance(out, tuple) else out).float()
        seconds = {name: [] for name in IMPLEMENTATIONS}
        for round_ in range(args.rounds):
            order = IMPLEMENTATIONS if round_ % 2 == 0 else IMPLEMENTATIONS[::-1]
            for name in order:
                seconds[name].append(fwd_bwd_seconds(model, block, name, x, args.iters))
        base = statistics.median(seconds["grouped_mm"])
        for name in IMPLEMENTATIONS:
            median = statistics.median(seconds[name])
            rows.append({"shape": shape_name, "experts": f"{shape['num_experts']} top-{shape['num_experts_per_tok']}",
                         "implementation": name, "fwd_bwd_s": median, "tokens_per_s": shape["tokens"] / median,
                         "vs_grouped_mm": base / median, "max_diff_vs_eager": (outputs[name] - outputs["eager"]).abs().max().item()})
    report("moe_layer", rows, args.out, {"device": str(device), "dtype": args.dtype, "rounds": args.rounds, "iters": args.iters, "shapes": SHAPES,
                                         "goal": "distrain vs_grouped_mm >= 1.0"})


if __name__ == "__main__":
    main()
