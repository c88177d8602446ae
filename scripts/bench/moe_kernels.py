"""distrain's Triton grouped GEMMs against torch's, at Qwen3-30B-A3B expert shapes, in bf16 on a GPU.

    python scripts/bench/moe_kernels.py [--tokens 8192 16384 32768] [--out results/bench]
    python scripts/bench/moe_kernels.py --compile-only [--out builds.json]   (no GPU needed)

Per token count T and routing (balanced: uniform top-k; skewed: expert e drawn with weight
1/(e+1)), one MoE layer's expert GEMMs (E=128 experts, H=2048, I=768, K=8 experts per token):
- forward: `gate_up` (the token rows gathered in expert order) and `down` (scaled by the routing
  weight, scattered back to (token, k) order): 6 x T x K x H x I FLOPs;
- dX and dW: the gradients of both GEMMs (each 6 x T x K x H x I FLOPs);
for distrain's kernels (gather and scatter fused into the loads and stores) and for torch's path
(`torch._grouped_mm` through `F.grouped_mm`, with the gather and scatter as separate copies, as
distrain's torch path runs them), with one dense cuBLAS GEMM pair of equal FLOPs as the roofline
of these shapes. Times are CUDA-event medians; the table gives TFLOP/s and ratios.

`--compile-only` compiles every autotuning config of both kernels for sm80 and sm90 (bf16, gather,
scatter and scale on) with Triton's ahead-of-time compiler and writes, per build, the tensor-core
instruction its PTX uses (wgmma / mma.sync), its shared memory and warps (the tests assert them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

E, H, I, TOP_K = 128, 2048, 768, 8


def compile_builds() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    from distrain.kernels import grouped_gemm as gg

    # the layer's real layouts (hidden states and gradients row-major, weights [E, out, in] read
    # transposed): what Triton's launcher specializes at run time, strides of 1 as constants and
    # pointers, sizes and strides divisible by 16 as hints, is given here the same way
    kernels = {
        "forward": (gg._grouped_mm_kernel, gg._fwd_configs(), {"GATHER": True, "SCATTER": True, "SCALE": True, "IEEE": False, "UPCAST": False, "E_BLOCK": E},
                    {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}),
        "dw": (gg._grouped_dw_kernel, gg._dw_configs(), {"A_INDEX": True, "G_INDEX": True, "SCALE": True, "IEEE": False, "UPCAST": False},
               {"stride_ak": 1, "stride_gn": 1, "stride_ck": 1}),
    }
    builds = []
    for name, (kernel, configs, flags, unit_strides) in kernels.items():
        signature, hints = {}, {}
        for i, param in enumerate(kernel.params):
            arg = param.name
            if param.is_constexpr or arg in unit_strides:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*i64" if "index" in arg or arg in ("gather_ptr", "scatter_ptr") else ("*i32" if arg == "offsets_ptr" else "*bf16")
                hints[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "i32"  # as Triton specializes ints below 2^31 at launch
                if arg.startswith("stride") or arg in ("N", "K"):
                    hints[(i,)] = [["tt.divisibility", 16]]
        for config in configs:
            constexprs = {**flags, **unit_strides, **config.kwargs}
            for arch in (80, 90):
                start = time.perf_counter()
                compiled = triton.compile(
                    triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=hints),
                    target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                )
                ptx = compiled.asm["ptx"]
                builds.append({
                    "kernel": name, "arch": arch, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
                    "tensor_core_op": "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else None),
                    "shared_bytes": compiled.metadata.shared, "pipelined_loads": compiled.asm["ttgir"].count("async_copy_global_to_local"),
                    "compile_s": round(time.perf_counter() - start, 2),
                })
    return builds


def _routing(tokens: int, skewed: bool, device):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    weights = 1.0 / torch.arange(1, E + 1) if skewed else torch.ones(E)
    index = torch.multinomial(weights.expand(tokens, E), TOP_K, generator=generator).to(device)  # distinct experts per token
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, torch.cumsum(counts, 0).to(torch.int32), counts


def _median_ms(fn, reps: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(tokens_list: list[int]) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from distrain.kernels.grouped_gemm import grouped_mm

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
    torch.manual_seed(0)
    w_gate_up = (torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, device=device, dtype=dtype) * I**-0.5).requires_grad_()
    rows_out = []
    for tokens in tokens_list:
        for routing in ("balanced", "skewed"):
            order, offsets, counts = _routing(tokens, routing == "skewed", device)
            x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
            weights = torch.rand(tokens * TOP_K, device=device, dtype=dtype, requires_grad=True)
            flops = 6 * tokens * TOP_K * H * I

            def triton_forward():
                gate_up = grouped_mm(x, w_gate_up.transpose(1, 2), offsets, order, TOP_K, None, None, order.numel())
                gate, up = gate_up.chunk(2, dim=-1)
                h = F.silu(gate) * up
                out = grouped_mm(h, w_down.transpose(1, 2), offsets, None, 1, order, weights[order], tokens * TOP_K)
                return out.view(tokens, TOP_K, H).sum(1)

            def torch_forward():
                rows = x[order // TOP_K]
                gate_up = torch_grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offsets)
                gate, up = gate_up.chunk(2, dim=-1)
                h = F.silu(gate) * up
                out = torch_grouped_mm(h, w_down.transpose(1, 2), offs=offsets) * weights[order].unsqueeze(-1)
                return torch.empty_like(out).index_copy_(0, order, out).view(tokens, TOP_K, H).sum(1)

            dense_a = torch.randn(tokens * TOP_K, H, device=device, dtype=dtype)
            dense_w1, dense_w2 = w_gate_up[0].detach().T.contiguous(), w_down[0].detach().T.contiguous()

            def dense():
                return (dense_a @ dense_w1)[:, :I] @ dense_w2

            row = {"tokens": tokens, "routing": routing, "max/mean rows": round(counts.max().item() / counts.float().mean().item(), 2)}
            # both bf16 paths against each other (outputs and all four gradients): ||a - b|| / ||b||
            grad = torch.randn(tokens, H, device=device, dtype=dtype)
            results = {}
            for name, forward in (("triton", triton_forward), ("torch", torch_forward)):
                out = forward()
                results[name] = [out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (x, w_gate_up, w_down, weights), grad))]
            row["rel err vs torch"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(results["triton"], results["torch"]))
            del results
            for name, forward in (("triton", triton_forward), ("torch", torch_forward)):
                with torch.no_grad():
                    row[f"{name} fwd TFLOP/s"] = flops / _median_ms(forward) / 1e9
                out = forward()
                grad = torch.randn_like(out)
                row[f"{name} dX TFLOP/s"] = flops / _median_ms(lambda: torch.autograd.grad(forward(), (x,), grad)) / 1e9
                row[f"{name} fwd+dX+dW TFLOP/s"] = 3 * flops / _median_ms(
                    lambda: torch.autograd.grad(forward(), (x, w_gate_up, w_down, weights), grad)) / 1e9
            row["dense fwd TFLOP/s"] = flops / _median_ms(dense) / 1e9
            row["triton/torch fwd"] = row["triton fwd TFLOP/s"] / row["torch fwd TFLOP/s"]
            row["triton/torch fwd+bwd"] = row["triton fwd+dX+dW TFLOP/s"] / row["torch fwd+dX+dW TFLOP/s"]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.compile_only:
        builds = compile_builds()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(builds, indent=1))
        for build in builds:
            print(build)
        return
    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("moe_kernels.py times the kernels on a CUDA GPU; here use --compile-only (tests/test_kernels.py runs them interpreted)")
    from _report import report

    from distrain.kernels import grouped_gemm as gg

    rows = bench(args.tokens)
    tuned = {kind: {str(key): str(config) for key, config in gg._tuned(kind)[0].cache.items()} for kind in ("fwd", "dw")}
    report("moe_kernels", rows, args.out, {"E": E, "H": H, "I": I, "K": TOP_K, "dtype": "bf16", "tuned configs": tuned,
                                           "goal": "triton >= 450 TFLOP/s forward and >= 400 forward+backward on an H100"})


if __name__ == "__main__":
    main()
