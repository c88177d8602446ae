"""distrain's Triton grouped GEMMs (distrain.kernels.grouped_gemm) under the interpreter, against
the torch twin; and their builds for sm80 / sm90, compiled here without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

# rows per expert (empty experts included), K, N: tiles partly filled, K and N not multiples of 16,
# an expert over several row tiles and K over several tiles (the interpreter's tiles are 32 wide);
# K < N and K > N (dW's routing weight scales the narrower operand, the other is read by index)
CASES = {
    "random groups, empty experts": ([3, 0, 17, 1, 0, 9], 24, 40),
    "every row on one expert": ([0, 0, 45, 0], 48, 64),
    "a single row": ([0, 1, 0], 20, 12),
    "K not a multiple of the tile": ([5, 6, 7], 37, 33),
    "no rows (an EP rank given none)": ([0, 0, 0], 20, 12),
}
# bf16: the interpreter's bf16 dot is wrong (ENV.md), so the kernels upcast its tiles there
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}


def _routing(counts: list[int], top_k: int, seed: int):
    """(token, k) slots whose experts have `counts` rows, sorted by expert: (slots, offsets, tokens)."""
    generator = torch.Generator().manual_seed(seed)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    tokens = -(-experts.numel() // top_k)
    slots = torch.randperm(tokens * top_k, generator=generator)[: experts.numel()]
    slots = slots[torch.argsort(experts, stable=True)]
    return slots, torch.cumsum(torch.tensor(counts), 0).to(torch.int32), tokens


def _check(mode: str, counts, k: int, n: int, dtype, seed: int = 0):
    from distrain.kernels import grouped_gemm
    from distrain.kernels.grouped_gemm import grouped_mm, reference_grouped_mm

    top_k = 2
    slots, offsets, tokens = _routing(counts, top_k, seed)
    rows = slots.numel()
    generator = torch.Generator().manual_seed(seed + 1)
    # fused: gather the token rows by slot // k, scale, scatter to the slots (the layer's two GEMMs
    # in one), and with "sum" also sum each token's k slots (the down GEMM's gradient rows then read
    # by slot // k); plain: rows already in expert order, weights stored transposed (a strided view)
    fused = mode != "plain"
    a = torch.randn(tokens if fused else rows, k, generator=generator).to(dtype).requires_grad_()
    b_storage = torch.randn(len(counts), n, k, generator=generator).to(dtype).requires_grad_()
    scale = torch.rand(rows, generator=generator).to(dtype).requires_grad_() if fused else None
    args = (slots, top_k, slots, scale, tokens * top_k, top_k if mode == "sum" else 1) if fused else (None, 1, None, None, rows)
    inputs = [a, b_storage] + ([scale] if fused else [])
    out = grouped_mm(a, b_storage.transpose(1, 2), offsets, *args)
    # the twin in fp32 on the same (rounded) inputs: a twin in fp16 / bf16 rounds too, by as much
    exact = [t.detach().float().requires_grad_() for t in inputs]
    exact_args = (*args[:3], exact[2], *args[4:]) if fused else args
    expected = reference_grouped_mm(exact[0], exact[1].transpose(1, 2), offsets, *exact_args)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    want = torch.autograd.grad(expected, exact, grad.float())
    # dW reads rows out of expert order by index in its loop or from copies (timed on CUDA): both
    for path in ("indexed", "copied") if fused else (None,):
        grouped_gemm.DW_PATH = path
        try:
            got = torch.autograd.grad(out, inputs, grad, retain_graph=True)
        finally:
            grouped_gemm.DW_PATH = None
        for name, x, y in zip(["dA", "dW", "dscale"], got, want):
            assert x.dtype == dtype
            torch.testing.assert_close(x.float(), y, **TOLERANCE[dtype], msg=lambda m, name=name: f"{path} {name}: {m}")
        empty = [e for e, c in enumerate(counts) if c == 0]
        assert all(got[1][e].abs().sum() == 0 for e in empty)  # exact zeros, not uninitialized memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", ["plain", "fused", "sum"], ids=["plain", "gather-scale-scatter", "gather-scale-scatter-sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_torch_twin(case, mode, dtype):
    counts, k, n = CASES[case]
    _check(mode, counts, k, n, dtype)


@pytest.mark.parametrize("mode", ["plain", "fused", "sum"], ids=["plain", "gather-scale-scatter", "gather-scale-scatter-sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_program_a_tile_matches_the_twin(case, mode, monkeypatch):
    """The kernels' other schedule and loads (the interpreter runs the persistent forward, its
    programs taking several tiles each, and both kernels load through descriptors where the launcher
    makes them): one program a tile, every tile loaded through pointers, as the autotuner may pick on a GPU."""
    from distrain.kernels import grouped_gemm

    monkeypatch.setitem(grouped_gemm._INTERPRET_FWD, "PERSISTENT", False)
    monkeypatch.setitem(grouped_gemm._INTERPRET_FWD, "TMA", False)
    monkeypatch.setitem(grouped_gemm._INTERPRET_DW, "TMA", False)
    counts, k, n = CASES[case]
    _check(mode, counts, k, n, torch.float32)


def test_a_gradient_in_another_dtype_is_cast_to_the_operands():
    """On CUDA under bf16 autocast the down GEMM's backward was handed an fp32 output gradient
    (torch 2.11, an H200): the compiled kernel refused fp32 x bf16 operands, where the interpreter's
    upcast hid it. The backward computes in the operands' dtype, and a mix at a launch is an error."""
    from types import SimpleNamespace

    from distrain.kernels.grouped_gemm import _backward, grouped_mm

    # the down GEMM: rows in expert order, each scaled, scattered to its (token, k) slot, k slots summed
    slots, offsets, tokens = _routing([3, 0, 5], 2, seed=0)
    a, b = torch.randn(slots.numel(), 40).bfloat16(), torch.randn(3, 40, 24).bfloat16()
    scale = torch.rand(slots.numel()).bfloat16()
    ctx = SimpleNamespace(saved_tensors=(a, b, offsets, None, slots, scale), gather_div=1, sum_k=2, needs_input_grad=[True, True] + [False] * 4 + [True])
    grad = torch.randn(tokens, 24)
    got = _backward(ctx, grad)
    want = _backward(ctx, grad.bfloat16())
    for x, y in zip(got, want):
        assert (x is None) == (y is None) and (x is None or (x.dtype == torch.bfloat16 and torch.equal(x, y)))
    with pytest.raises(TypeError, match="float32 and torch.bfloat16"):
        grouped_mm(a.float(), b, offsets, None, 1, None, None, slots.numel())


def test_the_builds_for_sm80_and_sm90_use_tensor_cores(tmp_path):
    """Every autotuning config of both kernels compiles for sm90 with warpgroup MMA (wgmma) and
    for sm80 with mma.sync, in bf16, within the chip's shared memory, its sm90 loop pipelined
    num_stages deep, or (num_stages + 1) // 2 with dW's rows read by index, the persistent forward's
    tile and K loops flattened into one, and the descriptor configs' in-order tiles loaded by the
    tensor memory accelerator (the forward's in both weight layouts); the elementwise kernels
    (fused gate, scaled rows) build with 16-byte loads and stores (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "builds.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "moe_kernels.py"), "--compile-only", "--out", str(out)],
                   check=True, env=env, timeout=600, capture_output=True)
    builds = json.loads(out.read_text())
    assert {(b["kernel"], b["arch"]) for b in builds} == {
        ("forward", 80), ("forward, pointers", 90), ("forward, descriptors", 90), ("forward, rows in order, descriptors", 90),
        ("dX, rows in order, descriptors", 90), ("dw", 80), ("dw", 90), ("dw, rows indexed", 90), ("dw, gradient rows indexed", 90),
        ("dw, descriptors", 90), ("dw, rows indexed, descriptors", 90), ("dw, gradient rows indexed, descriptors", 90),
        *((name, arch) for name in ("swiglu forward", "swiglu backward", "scaled rows") for arch in (80, 90))}
    for build in [b for b in builds if b.get("elementwise")]:  # memory-bound: 16-byte loads and stores
        assert build["vector_loads"] > 0 and build["vector_stores"] > 0, build
    for build in [b for b in builds if not b.get("elementwise")]:
        assert build["tensor_core_op"] == ("wgmma" if build["arch"] == 90 else "mma.sync"), build
        assert build["shared_bytes"] <= {80: 163 * 1024, 90: 227 * 1024}[build["arch"]], build
        assert build["pipelined_loads"] > 0, build  # loads software-pipelined into shared memory (cp.async or TMA)
        # the descriptor configs' in-order operands through the accelerator: a TMA copy into each buffer
        assert build["descriptor_operands"] == (build["TMA"] and (2 if "rows in order" in build["kernel"] or build["kernel"] == "dw, descriptors" else 1))
        assert build["descriptor_loads"] == build["descriptor_operands"] * build["buffers"], build
        if build["arch"] == 90:  # num_stages buffers deep (an indexed loop half that): an unpipelined loop holds one
            assert build["shared_bytes"] >= build["buffers"] * build["stage_bytes"], build
            # a persistent kernel's tile and K loops flatten into one pipeline (stores inside it)
            assert build["stores_in_mma_loop"] == build.get("PERSISTENT", False), build


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_swiglu_matches_the_torch_twin(dtype):
    """The fused SwiGLU (one pass forward, one backward) against transformers' default gate,
    `silu(gate) * up`, in fp32 on the same inputs: rows and the intermediate width not multiples of
    the tiles, no rows, a strided input (a column slice of a wider tensor)."""
    from distrain.kernels.swiglu import reference_swiglu, swiglu

    generator = torch.Generator().manual_seed(0)
    for rows, inner in [(37, 70), (1, 3), (0, 8), (20, 64)]:
        wide = torch.randn(rows, 2 * inner + 6, generator=generator).mul(3).to(dtype)
        for gate_up in (wide[:, : 2 * inner].contiguous(), wide[:, 3 : 3 + 2 * inner]):
            gate_up = gate_up.detach().requires_grad_()
            exact = gate_up.detach().float().requires_grad_()
            out, want = swiglu(gate_up), reference_swiglu(exact)
            assert out.dtype == dtype and out.shape == (rows, inner)
            torch.testing.assert_close(out.float(), want, **TOLERANCE[dtype])
            grad = torch.randn(rows, inner, generator=generator).to(dtype)
            (got,) = torch.autograd.grad(out, gate_up, grad)
            (expected,) = torch.autograd.grad(want, exact, grad.float())
            assert got.dtype == dtype and got.shape == gate_up.shape
            torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])
    with pytest.raises(ValueError, match="2 x intermediate"):
        swiglu(torch.randn(4, 5))
