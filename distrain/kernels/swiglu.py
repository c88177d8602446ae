"""SwiGLU in one pass each way, for the MoE experts' Triton path: `h = silu(gate) * up` from the
`gate_up` GEMM's output [R, 2I] (gate the first I columns, up the last I, transformers' default
`_apply_gate`), and its gradient into one [R, 2I] tensor.

Eager torch spends five passes on it, each over a strided half of `gate_up` (no vectorized loads):
silu and the product forward; the product's two gradients, silu's, and the concatenation of the
halves' gradients backward. On an H200 those took about a third of the layer's non-GEMM time at
Qwen3-30B-A3B shapes (`scripts/bench/moe_kernels.py --profile`). Here the forward reads `gate_up`
and writes `h` (3 x R x I elements), the backward reads `gate_up` and dh and writes the gradient
(5 x R x I), the math in fp32 with one rounding at the store. Custom ops with fake
implementations and autograd, as the GEMMs (`distrain.kernels.grouped_gemm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distrain.kernels.grouped_gemm import INTERPRET, cdiv

# rows x columns a program: 8 x 128 on a GPU (R x I / 1024 programs); the interpreter pays per program, so wider
BLOCK_R, BLOCK_C = (16, 64) if INTERPRET else (8, 128)


@triton.jit
def _swiglu_kernel(gu_ptr, dh_ptr, out_ptr, rows, I, stride_gu, stride_dh, stride_out,
                   BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r < rows)[:, None] & (c < I)[None, :]
    gate_at = gu_ptr + r[:, None] * stride_gu + c[None, :]
    gate = tl.load(gate_at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_at + I, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    if BACKWARD:  # d gate = dh * up * silu'(gate), silu' = sig * (1 + gate * (1 - sig)); d up = dh * silu(gate)
        dh = tl.load(dh_ptr + r[:, None] * stride_dh + c[None, :], mask=ok, other=0.0).to(tl.float32)
        out_at = out_ptr + r[:, None] * stride_out + c[None, :]
        tl.store(out_at, (dh * up * sig * (1.0 + gate * (1.0 - sig))).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_at + I, (dh * gate * sig).to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + r[:, None] * stride_out + c[None, :], (gate * sig * up).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(gate_up: torch.Tensor, dh: torch.Tensor | None) -> torch.Tensor:
    gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    rows, width = gate_up.shape
    inner = width // 2
    out = gate_up.new_empty(rows, width if dh is not None else inner)
    if rows and inner:
        if dh is not None:
            dh = dh.to(gate_up.dtype)
            dh = dh if dh.stride(-1) == 1 else dh.contiguous()
        _swiglu_kernel[(cdiv(rows, BLOCK_R), cdiv(inner, BLOCK_C))](
            gate_up, gate_up if dh is None else dh, out, rows, inner, gate_up.stride(0), 0 if dh is None else dh.stride(0), out.stride(0),
            BACKWARD=dh is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )
    return out


@torch.library.custom_op("distrain::swiglu", mutates_args=())
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[R, 2I] -> [R, I]: silu(gate_up[:, :I]) * gate_up[:, I:]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"distrain swiglu: gate_up of shape {tuple(gate_up.shape)}; expected [rows, 2 x intermediate]")
    return _launch(gate_up, None)


@swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("distrain::swiglu_backward", mutates_args=())
def swiglu_backward(grad: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu` at `gate_up` for output gradient `grad`: [R, 2I]."""
    return _launch(gate_up, grad)


@swiglu_backward.register_fake
def _(grad, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward(grad, gate_up)


swiglu.register_autograd(_backward, setup_context=_setup_context)


def reference_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch twin (transformers' default `_apply_gate` with SiLU), for the tests."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
