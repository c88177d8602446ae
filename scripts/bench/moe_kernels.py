"""distrain's Triton grouped GEMMs against torch's, at Qwen3-30B-A3B expert shapes, in bf16 on a GPU.

    python scripts/bench/moe_kernels.py [--tokens 8192 16384 32768] [--per-gemm 16384] [--profile 16384] [--out results/bench]
    python scripts/bench/moe_kernels.py --compile-only [--out builds.json]   (no GPU needed)

Per token count T and routing (balanced: uniform top-k; skewed: expert e drawn with weight
1/(e+1)), one MoE layer's expert GEMMs (E=128 experts, H=2048, I=768, K=8 experts per token):
- forward: `gate_up` (the token rows gathered in expert order) and `down` (scaled by the routing
  weight, scattered back to (token, k) order): 6 x T x K x H x I FLOPs;
- dX and dW: the gradients of both GEMMs (each 6 x T x K x H x I FLOPs);
for distrain's kernels (gather and scatter fused into the loads and stores) and for torch's path
(`torch._grouped_mm` through `F.grouped_mm`, with the gather and scatter as separate copies, as
distrain's torch path runs them), with one dense cuBLAS GEMM pair of equal FLOPs as the roofline
of these shapes. Times are medians of `triton.testing.do_bench` (calls queued back to back, as a
model's layers run; the L2 cache flushed before each, a 256 MB fill that also gives the host a
head start); the layer rows also give the median with each call timed alone (synchronized before
it, L2 not flushed: the host's latency to the first kernel in the time, as this script measured
before) and the host's time to queue one call (the GPU kept busy meanwhile; NaN where the GPU ran
dry first). The table gives TFLOP/s and ratios.

`--compile-only` compiles every autotuning config of both kernels for sm80 and sm90 (bf16; the
forward with gather, scatter and scale on, dW as the backward runs it: rows in expert order, and for
sm90 also either operand's rows indexed) with Triton's ahead-of-time
compiler and writes, per build, the tensor-core instruction its PTX uses (wgmma / mma.sync), its
shared memory against one pipeline stage's tiles, and its warps; and the layer's elementwise kernels
(fused gate, scaled rows) with their 16-byte loads and stores (the tests assert them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

E, H, I, TOP_K = 128, 2048, 768, 8


def _build_specs():
    """name: (kernel, configs, flags, unit strides, archs) of each build the compile check makes."""
    from distrain.kernels import grouped_gemm as gg

    # the layer's real layouts (hidden states and gradients row-major, weights [E, out, in] read
    # transposed): what Triton's launcher specializes at run time, strides of 1 as constants and
    # pointers, sizes and strides divisible by 16 as hints, is given here the same way
    fwd = {"IEEE": False, "UPCAST": False, "E_BLOCK": E}
    pointers = [c for c in gg._fwd_configs() if not c.kwargs["TMA"]]
    descriptors = [c for c in gg._fwd_configs() if c.kwargs["TMA"]]  # (sm90+: the launcher makes none on sm80)
    dw = {"SCALE": False, "IEEE": False, "UPCAST": False, "A_TMA": False, "G_TMA": False}
    dw_pointers = [c for c in gg._dw_configs() if not c.kwargs["TMA"]]
    dw_descriptors = [c for c in gg._dw_configs() if c.kwargs["TMA"]]
    dw_strides = {"stride_ak": 1, "stride_gn": 1, "stride_ck": 1}
    return {
        # the gate_up GEMM's: rows gathered (through pointers), the weights through a descriptor or pointers
        "forward": (gg._grouped_mm_kernel, pointers, {**fwd, "GATHER": True, "SCATTER": True, "SCALE": True, "A_TMA": False, "B_TMA": 0},
                    {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}, (80,)),
        # on sm90 pointer loads run only where no descriptor can be made: a program-a-tile config and the persistent ones
        "forward, pointers": (gg._grouped_mm_kernel, [pointers[2], *(c for c in pointers if c.kwargs["PERSISTENT"])],
                              {**fwd, "GATHER": True, "SCATTER": True, "SCALE": True, "A_TMA": False, "B_TMA": 0},
                              {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}, (90,)),
        "forward, descriptors": (gg._grouped_mm_kernel, descriptors, {**fwd, "GATHER": True, "SCATTER": False, "SCALE": False, "A_TMA": False, "B_TMA": 1},
                                 {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}, (90,)),
        # the down GEMM's forward (rows in order, weights [E, out, in]) and gate_up's dX (weights as stored): both by descriptor
        "forward, rows in order, descriptors": (gg._grouped_mm_kernel, descriptors,
                                                {**fwd, "GATHER": False, "SCATTER": True, "SCALE": True, "A_TMA": True, "B_TMA": 1},
                                                {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}, (90,)),
        "dX, rows in order, descriptors": (gg._grouped_mm_kernel, descriptors, {**fwd, "GATHER": False, "SCATTER": True, "SCALE": False, "A_TMA": True, "B_TMA": 2},
                                           {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1}, (90,)),
        # dW as the backward runs it (the routing weight already applied): rows in expert order,
        # or one operand's rows read by index in the loop (the indices take pipeline stages too;
        # sm90 only: its pipelining is what the check is about); through pointers, or the in-order
        # operands' whole row tiles through descriptors
        "dw": (gg._grouped_dw_kernel, dw_pointers, {**dw, "A_INDEX": False, "G_INDEX": False}, dw_strides, (80, 90)),
        # the indexed variants build a shallow and a deep config each (their depth is what is checked;
        # every config builds in the kinds above: the suite's time)
        "dw, rows indexed": (gg._grouped_dw_kernel, [dw_pointers[0], dw_pointers[8]], {**dw, "A_INDEX": True, "G_INDEX": False}, dw_strides, (90,)),
        # the down GEMM's: the gradient's rows by index (the scaled intermediate rows copied)
        "dw, gradient rows indexed": (gg._grouped_dw_kernel, [dw_pointers[0], dw_pointers[8]], {**dw, "A_INDEX": False, "G_INDEX": True}, dw_strides, (90,)),
        "dw, descriptors": (gg._grouped_dw_kernel, dw_descriptors, {**dw, "A_INDEX": False, "G_INDEX": False, "A_TMA": True, "G_TMA": True},
                            dw_strides, (90,)),
        "dw, rows indexed, descriptors": (gg._grouped_dw_kernel, [dw_descriptors[0], dw_descriptors[3]],
                                          {**dw, "A_INDEX": True, "G_INDEX": False, "G_TMA": True}, dw_strides, (90,)),
        "dw, gradient rows indexed, descriptors": (gg._grouped_dw_kernel, [dw_descriptors[0], dw_descriptors[3]],
                                                   {**dw, "A_INDEX": False, "G_INDEX": True, "A_TMA": True}, dw_strides, (90,)),
    }


def compile_builds() -> list[dict]:
    """Every build of `_build_specs`, compiled in a process per core (each takes 1-3 s)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(name, i, arch) for name, (_, configs, _, _, archs) in _build_specs().items() for i in range(len(configs)) for arch in archs]
    elementwise = [(name, arch) for name in _ELEMENTWISE for arch in (80, 90)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), len(os.sched_getaffinity(0)), 8)) as pool:  # (each holds ~1 GB)
        return list(pool.map(_compile_one, jobs)) + list(pool.map(_compile_elementwise, elementwise))


# the layer's elementwise kernels: (module, kernel, pointer types, constexprs), bf16 as on a GPU
_ELEMENTWISE = {
    "swiglu forward": ("swiglu", "_swiglu_kernel", {"gu_ptr": "*bf16", "dh_ptr": "*bf16", "out_ptr": "*bf16"}, {"BACKWARD": False, "BLOCK_R": 8, "BLOCK_C": 128}),
    "swiglu backward": ("swiglu", "_swiglu_kernel", {"gu_ptr": "*bf16", "dh_ptr": "*bf16", "out_ptr": "*bf16"}, {"BACKWARD": True, "BLOCK_R": 8, "BLOCK_C": 128}),
    "scaled rows": ("grouped_gemm", "_scaled_rows_kernel", {"x_ptr": "*bf16", "y_ptr": "*bf16", "scale_ptr": "*bf16", "dot_ptr": "*fp32", "xs_ptr": "*bf16",
                                                             "ys_ptr": "*bf16"}, {"SCALED_X": True, "SCALED_Y": True, "BLOCK_R": 8, "BLOCK_C": 256}),
}


def _compile_elementwise(job: tuple[str, int]) -> dict:
    """An elementwise kernel's build, with how many of its loads and stores move 16 bytes (row
    strides and widths divisible by 16, as the launcher specializes the layer's)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    name, arch = job
    module, kernel_name, pointers, constexprs = _ELEMENTWISE[name]
    kernel = getattr(importlib.import_module(f"distrain.kernels.{module}"), kernel_name)
    signature, hints = {}, {}
    for i, param in enumerate(kernel.params):
        signature[param.name] = "constexpr" if param.name in constexprs else pointers.get(param.name, "i32")
        if param.name in pointers or param.name.startswith("stride") or param.name in ("I", "width"):
            hints[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=hints),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    return {"kernel": name, "arch": arch, "elementwise": True, "vector_loads": ptx.count("ld.global.v4"), "vector_stores": ptx.count("st.global.v4")}


def _compile_one(job: tuple[str, int, int]) -> dict:
    from types import SimpleNamespace

    import triton
    from triton.backends.compiler import GPUTarget

    from distrain.kernels import grouped_gemm as gg

    name, index, arch = job
    kernel, configs, flags, unit_strides, _ = _build_specs()[name]
    config = configs[index]
    signature, hints = {}, {}
    for i, param in enumerate(kernel.params):
        arg = param.name
        if param.is_constexpr or arg in unit_strides:
            signature[arg] = "constexpr"
        elif arg.endswith("_desc"):  # a descriptor with the config's block shape (`_set_blocks`), or the tensor
            nargs = {**flags, **config.kwargs, "a_desc": SimpleNamespace(), "b_desc": SimpleNamespace(), "g_desc": SimpleNamespace()}
            (gg._set_blocks if kernel is gg._grouped_mm_kernel else gg._set_dw_blocks)(nargs)
            block = getattr(nargs[arg], "block_shape", None)
            signature[arg] = f"tensordesc<bf16[{block[0]}, {block[1]}]>" if block else "*bf16"
        elif arg.endswith("_ptr"):
            signature[arg] = "*i64" if "index" in arg or arg in ("gather_ptr", "scatter_ptr") else ("*i32" if arg == "offsets_ptr" else "*bf16")
            hints[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"  # as Triton specializes ints below 2^31 at launch
            if arg.startswith("stride") or arg in ("N", "K"):
                hints[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs={**flags, **unit_strides, **config.kwargs}, attrs=hints),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {
        "kernel": name, "arch": arch, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
        "tensor_core_op": "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else None),
        "shared_bytes": compiled.metadata.shared, "pipelined_loads": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
        "descriptor_loads": ttgir.count("async_tma_copy_global_to_local"),
        "descriptor_operands": int(config.kwargs["TMA"]) * (int(bool(flags.get("A_TMA"))) + int(bool(flags.get("B_TMA") or flags.get("G_TMA")))),
        "stores_in_mma_loop": _stores_in_mma_loop(ttgir),
        # one stage's operand tiles (bf16): a loop pipelined num_stages deep holds num_stages of them,
        # an indexed one (num_stages + 1) // 2 (its indices are loaded a stage ahead of the rows)
        "stage_bytes": 2 * (config.kwargs["BLOCK_K"] * (config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]) if kernel is gg._grouped_mm_kernel
                            else config.kwargs["BLOCK_R"] * (config.kwargs["BLOCK_K"] + config.kwargs["BLOCK_N"])),
        "buffers": (config.num_stages + 1) // 2 if flags.get("A_INDEX") or flags.get("G_INDEX") else config.num_stages,
        "compile_s": round(time.perf_counter() - start, 2),
    }


def _stores_in_mma_loop(ttgir: str) -> bool:
    """Whether the loop around the kernel's (first) tensor-core op also stores: a persistent
    kernel's tile and K loops flattened into one pipeline, the next tile's loads issued before
    this tile's stores; a tile a program stores after its K loop."""
    lines = ttgir.splitlines()
    mma = next(i for i, line in enumerate(lines) if "warp_group_dot " in line or "tt.dot " in line or "ttg.mma" in line)
    start = max(i for i in range(mma) if "scf.for" in lines[i])
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(" " * indent + "}"))
    return any("tt.store" in line for line in lines[start:end])


def _routing(tokens: int, skewed: bool, device):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    weights = 1.0 / torch.arange(1, E + 1) if skewed else torch.ones(E)
    index = torch.multinomial(weights.expand(tokens, E), TOP_K, generator=generator).to(device)  # distinct experts per token
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, torch.cumsum(counts, 0).to(torch.int32), counts


def _queued_ms(fn) -> float:
    """The median time of `fn` among calls queued back to back (Triton's `do_bench`: CUDA events
    around each call, the L2 cache flushed before it, one synchronization at the end)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _host_ms(fn, calls: int = 10) -> float:
    """The host's time to queue one call of `fn` while the GPU is busy (so it never waits on it):
    what the layer costs the CPU, beside the GPU's time. NaN where the GPU ran dry before the
    calls were queued (the host waited on it somewhere, or took longer than the GPU's spin)."""
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # (about 0.1 s of GPU spinning)
    spun = torch.cuda.Event()
    spun.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    drained = spun.query()
    torch.cuda.synchronize()
    return float("nan") if drained else host


def _median_ms(fn, reps: int = 10) -> float:
    """The median time of `fn` with each call timed alone (synchronized before it: the host's
    latency to the first kernel counts)."""
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


def _layer(gemm, x, w_gate_up, w_down, weights, order, offsets, fused: bool):
    """One MoE layer's experts: distrain's fused kernels (`fused`) or a grouped GEMM `gemm(a, b, offs)`
    with the gather and scatter as copies, as distrain's torch path runs them."""
    import torch
    import torch.nn.functional as F

    from distrain.kernels.grouped_gemm import grouped_mm
    from distrain.kernels.swiglu import swiglu

    tokens = x.shape[0]
    if fused:  # the gate in one pass (as the layer runs transformers' default one on the Triton path); the
        # down GEMM's rows scaled, scattered to the (token, k) slots and summed over k inside the op
        h = swiglu(grouped_mm(x, w_gate_up.transpose(1, 2), offsets, order, TOP_K, None, None, order.numel()))
        return grouped_mm(h, w_down.transpose(1, 2), offsets, None, 1, order, weights[order], tokens * TOP_K, TOP_K)
    gate, up = gemm(x[order // TOP_K], w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out = gemm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets) * weights[order].unsqueeze(-1)
    out = torch.empty_like(out).index_copy_(0, order, out)
    return out.view(tokens, TOP_K, -1).sum(1)


def _loop_gemm(a, b, offs):
    """The fp32 reference: one matmul per expert."""
    import torch

    pieces, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        pieces.append(a[start:end] @ b[expert])
        start = end
    return torch.cat(pieces)


def bench(tokens_list: list[int]) -> list[dict]:
    import torch

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w_gate_up = (torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, device=device, dtype=dtype) * I**-0.5).requires_grad_()
    rows_out = []
    for tokens in tokens_list:
        for routing in ("balanced", "skewed"):
            order, offsets, counts = _routing(tokens, routing == "skewed", device)
            x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
            weights = torch.rand(tokens, TOP_K, device=device, dtype=dtype).reshape(-1).requires_grad_()
            params = (x, w_gate_up, w_down, weights)
            flops = 6 * tokens * TOP_K * H * I
            paths = {"triton": lambda: _layer(None, *params, order, offsets, fused=True),
                     "torch": lambda: _layer(_torch_grouped_mm(), *params, order, offsets, fused=False)}
            row = {"tokens": tokens, "routing": routing, "max/mean rows": round(counts.max().item() / counts.float().mean().item(), 2)}
            # accuracy: the output and all four gradients against an fp32 loop, ||a - ref|| / ||ref||
            grad = torch.randn(tokens, H, device=device, dtype=dtype)
            leaves = [t.detach().float().requires_grad_() for t in params]
            ref_out = _layer(_loop_gemm, *leaves, order, offsets, fused=False)
            reference = [ref_out.detach(), *torch.autograd.grad(ref_out, leaves, grad.float())]
            del leaves, ref_out
            for name, forward in paths.items():
                out = forward()
                got = [out.detach(), *torch.autograd.grad(out, params, grad)]
                errors = [((g.float() - r).norm() / r.norm()).item() for g, r in zip(got, reference)]
                row[f"{name} rel err"] = max(errors)
                row[f"{name} rel err out/dx/dw1/dw2/dweights"] = " ".join(f"{e:.1e}" for e in errors)
            del reference, got
            for name, forward in paths.items():
                both = lambda: torch.autograd.grad(forward(), params, grad)  # noqa: E731
                with torch.no_grad():
                    row[f"{name} fwd TFLOP/s"] = flops / _queued_ms(forward) / 1e9
                    row[f"{name} fwd TFLOP/s, each call alone"] = flops / _median_ms(forward) / 1e9
                    row[f"{name} fwd host ms"] = _host_ms(forward)
                row[f"{name} fwd+bwd TFLOP/s"] = 3 * flops / _queued_ms(both) / 1e9
                row[f"{name} fwd+bwd TFLOP/s, each call alone"] = 3 * flops / _median_ms(both) / 1e9
                row[f"{name} fwd+bwd host ms"] = _host_ms(both)
            dense_a = torch.randn(tokens * TOP_K, H, device=device, dtype=dtype)
            dense_w1, dense_w2 = w_gate_up[0].detach().T.contiguous(), w_down[0].detach().T.contiguous()
            row["dense fwd TFLOP/s"] = flops / _queued_ms(lambda: (dense_a @ dense_w1)[:, :I] @ dense_w2) / 1e9
            row["triton/torch fwd"] = row["triton fwd TFLOP/s"] / row["torch fwd TFLOP/s"]
            row["triton/torch fwd+bwd"] = row["triton fwd+bwd TFLOP/s"] / row["torch fwd+bwd TFLOP/s"]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def profile_layer(tokens: int) -> list[dict]:
    """Where one fused layer's forward + backward spends its GPU time (balanced routing): the
    kernels by total time per step, with their share, from torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    params, order, offsets, grad = _layer_inputs(tokens, False)
    steps = 5
    for _ in range(3):  # (autotuned and timed already by `bench`; this warms the rest)
        torch.autograd.grad(_layer(None, *params, order, offsets, fused=True), params, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(_layer(None, *params, order, offsets, fused=True), params, grad)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events)
    rows = [{"tokens": tokens, "kernel": e.key[:100], "calls per step": e.count / steps, "ms per step": e.self_device_time_total / steps / 1e3,
             "share": round(e.self_device_time_total / total, 3)} for e in sorted(events, key=lambda e: -e.self_device_time_total)]
    return rows[:20]


def compare_descriptors(tokens: int) -> list[dict]:
    """Both kernels autotuned among the configs that load through pointers only, then among those
    that load through descriptors where the launcher makes them: the forward kernel's four GEMMs
    and the fused layer (balanced routing), side by side in one process."""
    import torch

    from distrain.kernels import grouped_gemm as gg

    tuners = [gg._tuned("fwd")[0], gg._tuned("dw")[0]]
    prunes = [tuner.early_config_prune for tuner in tuners]
    gemms = ("fwd gate_up", "fwd down", "dX gate_up", "dX down")
    results = {}
    for variant, tma in (("pointers", False), ("descriptors", True)):
        for tuner in tuners:
            tuner.cache.clear()
            tuner.early_config_prune = lambda configs, nargs, tma=tma, **kw: [
                c for c in configs if c.kwargs["TMA"] == (tma and bool(kw["A_TMA"] or kw.get("B_TMA") or kw.get("G_TMA")))]
        gg._chosen_paths.clear()  # (dW's way of reading rows, timed again with these configs)
        for row in per_gemm(tokens, False, gemms):
            results.setdefault(row["gemm"], {})[variant] = row["triton TFLOP/s"]
        params, order, offsets, grad = _layer_inputs(tokens, False)
        flops = 6 * tokens * TOP_K * H * I
        with torch.no_grad():
            results.setdefault("layer fwd", {})[variant] = flops / _queued_ms(lambda: _layer(None, *params, order, offsets, fused=True)) / 1e9
        results.setdefault("layer fwd+bwd", {})[variant] = 3 * flops / _queued_ms(
            lambda: torch.autograd.grad(_layer(None, *params, order, offsets, fused=True), params, grad)) / 1e9
        results.setdefault("tuned", {})[variant] = "; ".join(f"{key[:2]}: {config}" for tuner in tuners for key, config in tuner.cache.items())
        print(variant, {name: round(r[variant], 1) for name, r in results.items() if name != "tuned"}, flush=True)
    for tuner, prune in zip(tuners, prunes):
        tuner.early_config_prune = prune
        tuner.cache.clear()
    gg._chosen_paths.clear()
    tuned = results.pop("tuned")
    print(json.dumps(tuned, indent=1))
    return [{"tokens": tokens, "what": name, "pointers TFLOP/s": r["pointers"], "descriptors TFLOP/s": r["descriptors"],
             "descriptors / pointers": r["descriptors"] / r["pointers"]} for name, r in results.items()]


def _layer_inputs(tokens: int, skewed: bool):
    """One layer's expert inputs at these shapes: (x, w_gate_up, w_down, routing weights), order, offsets, an output gradient."""
    import torch

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w_gate_up = (torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, device=device, dtype=dtype) * I**-0.5).requires_grad_()
    order, offsets, _ = _routing(tokens, skewed, device)
    x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
    weights = torch.rand(tokens, TOP_K, device=device, dtype=dtype).reshape(-1).requires_grad_()
    return (x, w_gate_up, w_down, weights), order, offsets, torch.randn(tokens, H, device=device, dtype=dtype)


def _torch_grouped_mm():
    import torch
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10


def per_gemm(tokens: int, skewed: bool, only: tuple[str, ...] | None = None) -> list[dict]:
    """Each of the six expert GEMMs alone, distrain's kernel (gather, scatter and scale inside)
    against torch's grouped GEMM on rows already in expert order (the copies not counted): where
    the time goes, for tuning."""
    import torch

    from distrain.kernels.grouped_gemm import _launch_dw, grouped_mm

    device, dtype = torch.device("cuda"), torch.bfloat16
    tg = _torch_grouped_mm()
    order, offsets, _ = _routing(tokens, skewed, device)
    rows = order.numel()
    w_gu = torch.randn(E, 2 * I, H, device=device, dtype=dtype) * H**-0.5
    w_d = torch.randn(E, H, I, device=device, dtype=dtype) * I**-0.5
    x = torch.randn(tokens, H, device=device, dtype=dtype)
    xs = x[order // TOP_K]
    h = torch.randn(rows, I, device=device, dtype=dtype)
    g_gu = torch.randn(rows, 2 * I, device=device, dtype=dtype)
    g_out = torch.randn(tokens, H, device=device, dtype=dtype)  # the layer output's gradient: one row per token
    g_sorted = g_out[order // TOP_K]
    scale = torch.rand(rows, device=device, dtype=dtype)
    gemms = {  # name: (FLOPs, distrain, torch)
        "fwd gate_up": (2 * rows * H * 2 * I, lambda: grouped_mm(x, w_gu.transpose(1, 2), offsets, order, TOP_K, None, None, rows),
                        lambda: tg(xs, w_gu.transpose(1, 2), offs=offsets)),
        "fwd down": (2 * rows * I * H, lambda: grouped_mm(h, w_d.transpose(1, 2), offsets, None, 1, order, scale, rows),
                     lambda: tg(h, w_d.transpose(1, 2), offs=offsets)),
        "dX gate_up": (2 * rows * 2 * I * H, lambda: grouped_mm(g_gu, w_gu, offsets, None, 1, order, None, rows),
                       lambda: tg(g_gu, w_gu, offs=offsets)),
        "dX down": (2 * rows * H * I, lambda: grouped_mm(g_out, w_d, offsets, order, TOP_K, None, None, rows),
                    lambda: tg(g_sorted, w_d, offs=offsets)),
        # dW as the backward runs it, both ways it reads rows out of expert order (grouped_mm_dw times
        # them once per shape and keeps the faster): by index in its loop, or from copies made first
        "dW gate_up, rows indexed": (2 * rows * H * 2 * I, lambda: _launch_dw(x, g_gu, offsets, order // TOP_K, 1, None, None, w_gu.transpose(1, 2)),
                                     lambda: tg(xs.T, g_gu, offs=offsets)),
        "dW gate_up, rows copied": (2 * rows * H * 2 * I, lambda: _launch_dw(x[order // TOP_K], g_gu, offsets, None, 1, None, None, w_gu.transpose(1, 2)),
                                    lambda: tg(xs.T, g_gu, offs=offsets)),
        "dW down, rows indexed (scaled copy of h)": (2 * rows * I * H, lambda: _launch_dw(h * scale.unsqueeze(-1), g_out, offsets, None, 1, order // TOP_K, None, w_d.transpose(1, 2)),
                                                     lambda: tg(h.T, g_sorted, offs=offsets)),
        "dW down, rows copied (and h scaled)": (2 * rows * I * H, lambda: _launch_dw(h * scale.unsqueeze(-1), g_out[order // TOP_K], offsets, None, 1, None, None, w_d.transpose(1, 2)),
                                                lambda: tg(h.T, g_sorted, offs=offsets)),
    }
    table = []
    for name, (flops, ours, theirs) in gemms.items():
        if only is not None and name not in only:
            continue
        row = {"tokens": tokens, "routing": "skewed" if skewed else "balanced", "gemm": name, "triton TFLOP/s": flops / _queued_ms(ours) / 1e9}
        try:
            row["torch TFLOP/s"] = flops / _queued_ms(theirs) / 1e9
        except Exception as error:  # noqa: BLE001 - a torch version without this layout: say so, go on
            row["torch TFLOP/s"] = f"{type(error).__name__}"
        print(json.dumps(row), flush=True)
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--per-gemm", type=int, nargs="*", default=[16384], help="token counts for the per-GEMM table")
    parser.add_argument("--profile", type=int, nargs="*", default=[], help="token counts for a profile of the fused layer's kernels")
    parser.add_argument("--compare-descriptors", type=int, nargs="*", default=[], help="token counts for pointer against descriptor loads")
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

    compared = [row for tokens in args.compare_descriptors for row in compare_descriptors(tokens)]
    if compared:
        report("moe_kernels_descriptors", compared, args.out)
    gemm_rows = [row for tokens in args.per_gemm for skewed in (False, True) for row in per_gemm(tokens, skewed)]
    if gemm_rows:
        report("moe_kernels_per_gemm", gemm_rows, args.out)
    rows = bench(args.tokens)
    tuned = {kind: {str(key): str(config) for key, config in gg._tuned(kind)[0].cache.items()} for kind in ("fwd", "dw")}
    tuned["dW paths"] = {str(key): path for key, path in gg._chosen_paths.items()}
    if rows:
        report("moe_kernels", rows, args.out, {"E": E, "H": H, "I": I, "K": TOP_K, "dtype": "bf16", "tuned configs": tuned,
                                               "goal": "triton >= 450 TFLOP/s forward and >= 400 forward+backward on an H100"})
    profiles = [row for tokens in args.profile for row in profile_layer(tokens)]
    if profiles:
        report("moe_kernels_profile", profiles, args.out)


if __name__ == "__main__":
    main()
