"""Triton grouped GEMMs for the MoE experts: forward, dX and dW over variable group sizes.

Rows are grouped by expert: rows `offsets[e-1]:offsets[e]` (`offsets` the cumulative counts,
computed once per layer call) belong to expert e, whose weight is `b[e]`. Empty experts cost
nothing and get exact zero gradients.

    forward / dX   C[scatter[i]] = scale[i] * A[gather[i] // gather_div] @ B[e(i)]
                   (then, with sum_k > 1, the sum of each sum_k consecutive rows of C)
    dW             C[e] = sum over rows i of e: A[rowA(i)]^T @ (scale[i] * G[rowG(i)])

Every index is optional (identity). The MoE layer (`distrain.moe.experts`) uses them to fuse its
permutations into the GEMMs: the `gate_up` GEMM gathers the token rows in expert order inside its
loads (`gather` = the (token, k) slot of each sorted row, `gather_div` = k), so no permuted copy of
the hidden states exists; the `down` GEMM multiplies by the routing weight, scatters each row to its
(token, k) slot inside its stores and sums each token's k slots (`sum_k` = k: a fixed order, no
atomics). Its backward then reads the token's gradient row for every slot by index (`scatter[i] //
k`), never materializing the k copies autograd's sum would expand it to. The backward passes run
the same kernels with gather and scatter swapped; dW reads rows out of expert order either by index
in its loop or from copies made first, whichever ran faster when timed once per shape on CUDA
(`grouped_mm_dw`). Index arithmetic is int64 (rows x features passes 2^31 at real sizes).

Each kernel is a `torch.library.custom_op` with a fake implementation and autograd, so
`torch.compile`, selective activation checkpointing and the op counters see ops, not Python.
On sm90+ tiles whose rows are read in order (the weights always; A and dW's operands where not
indexed) load through tensor descriptors, the tensor memory accelerator's copies (`_descriptors`).
On CUDA the tile sizes are autotuned per (N, K, rows-per-expert bucket, fused indexing, descriptors)
for sm80 / sm90, and so is the forward's schedule: a program a tile, or persistent (a program an SM
taking tiles in turn, its tile and K loops flattened into one software pipeline, so a tile's first
loads overlap the previous tile's stores: the `down` GEMM's K=768 gives a tile only 12 steps); under
`TRITON_INTERPRET=1` (CPU, tests) one fixed config runs. The interpreter's bf16 arithmetic is wrong
(ENV.md): test in fp32 / fp16. `reference_grouped_mm` is the torch twin the tests compare against.
`scaled_rows` does the scaled GEMM's backward row work (the routing weights' gradient, the scaled
row copies) in one pass.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# host-side cdiv and next power of 2 for the launches: Triton's own are constexpr functions, about
# 10 us a call in Python (a layer's forward + backward made 28 such calls)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _tile_table(offsets_ptr, num_experts, BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr):
    """Every expert's first row and M-tile count, and the tiles through it: one vector load and a
    cumulative sum, no loop."""
    e = tl.arange(0, E_BLOCK)
    real = e < num_experts
    ends = tl.load(offsets_ptr + e, mask=real, other=0).to(tl.int64)
    starts = tl.load(offsets_ptr + e - 1, mask=real & (e > 0), other=0).to(tl.int64)
    tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return e, starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _indexed_rows(index_ptr, rows, row_ok, div, INDEXED: tl.constexpr):
    """The operand rows that sorted rows `rows` read or write: index[rows] // div (int64), or
    `rows` themselves without an index."""
    if INDEXED:
        return tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64) // div
    return rows


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, a_desc, b_desc, gather_ptr, scatter_ptr, scale_ptr, offsets_ptr,
    num_experts, N, K, gather_div,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    ROWS_BUCKET,  # the autotuning key's rows-per-expert bucket (unused in the body)
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    A_TMA: tl.constexpr, B_TMA: tl.constexpr,  # which descriptors the launcher made (`_descriptors`)
    E_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERSISTENT: tl.constexpr,
    TMA: tl.constexpr,
):
    # N tiles vary fastest: the programs running at once share a few M tiles (rows of A, read
    # from memory once, then from L2) and their experts' weights (in L2 across the expert's M tiles)
    e, starts, ends, tiles, tiles_through = _tile_table(offsets_ptr, num_experts, BLOCK_M, E_BLOCK)
    num_tiles = tl.sum(tiles, 0) * tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # the grid's programs (one an SM) take the tiles in turn; the tile loop and the K loop flatten into
        # one software pipeline, so a tile's first loads overlap the previous tile's stores (K=768
        # gives a tile only 12 steps of 64)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _mm_tile(tile, e, starts, ends, tiles, tiles_through, a_ptr, b_ptr, c_ptr, a_desc, b_desc, gather_ptr, scatter_ptr, scale_ptr,
                     N, K, gather_div, stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                     GATHER, SCATTER, SCALE, IEEE, UPCAST, TMA, A_TMA, B_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # a program a tile (the grid's bound on the tiles: the rest exit at once)
        if tl.program_id(0) < num_tiles:
            _mm_tile(tl.program_id(0), e, starts, ends, tiles, tiles_through, a_ptr, b_ptr, c_ptr, a_desc, b_desc, gather_ptr, scatter_ptr,
                     scale_ptr, N, K, gather_div, stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                     GATHER, SCATTER, SCALE, IEEE, UPCAST, TMA, A_TMA, B_TMA, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _mm_tile(
    tile, e, starts, ends, tiles, tiles_through, a_ptr, b_ptr, c_ptr, a_desc, b_desc, gather_ptr, scatter_ptr, scale_ptr,
    N, K, gather_div, stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of C (the tile-th, N tiles fastest). With TMA and A_TMA the A tile comes
    through its descriptor (rows in expert order; rows past the expert's end belong to the next one
    or are zeros, and their output rows are masked off), with B_TMA 1 / 2 the weight tile through a
    descriptor of b as [E x N, K] / [E x K, N] (`_descriptors`)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = (tile // tiles_n).to(tl.int64)
    pid_n = tile % tiles_n
    expert = tl.sum((tiles_through <= pid_m).to(tl.int64), 0)  # experts wholly before this tile
    mine = e == expert
    first_row = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - tl.sum(tl.where(mine, tiles_through - tiles, 0), 0)) * BLOCK_M
    end = tl.sum(tl.where(mine, ends, 0), 0)
    rows = first_row + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < end
    a_rows = _indexed_rows(gather_ptr, rows, row_ok, gather_div, GATHER)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        if TMA and A_TMA:
            a = a_desc.load([first_row.to(tl.int32), k0])
        else:
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if TMA and B_TMA == 1:  # columns past N read the next expert's rows: masked off at the store
            b = b_desc.load([(expert * N + pid_n * BLOCK_N).to(tl.int32), k0]).T
        elif TMA and B_TMA == 2:  # (only where BLOCK_K divides K: rows past K would be the next expert's)
            b = b_desc.load([(expert * K + k0).to(tl.int32), (pid_n * BLOCK_N).to(tl.int32)])
        else:
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (ENV.md): fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE or UPCAST:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_rows = _indexed_rows(scatter_ptr, rows, row_ok, 1, SCATTER)
    tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_dw_kernel(
    a_ptr, g_ptr, c_ptr, a_desc, g_desc, a_index_ptr, g_index_ptr, scale_ptr, offsets_ptr,
    K, N, a_div,
    stride_am, stride_ak, stride_gm, stride_gn, stride_ce, stride_ck, stride_cn,
    ROWS_BUCKET,
    A_INDEX: tl.constexpr, G_INDEX: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    A_TMA: tl.constexpr, G_TMA: tl.constexpr,  # which descriptors the launcher made (`_dw_descriptors`)
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TMA: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + expert).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = ks < K
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    masked_from = start
    if TMA and (A_TMA or G_TMA):
        # the expert's whole row tiles with the in-order operands through descriptors (a tile past
        # the expert's end would read the next expert's rows, which a descriptor cannot mask)
        masked_from = start + (end - start) // BLOCK_R * BLOCK_R
        for r0 in range(start.to(tl.int32), masked_from.to(tl.int32), BLOCK_R):  # (a descriptor's coordinates are int32)
            rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            if A_TMA:
                a = a_desc.load([r0, pid_k * BLOCK_K])
            else:
                a_rows = _indexed_rows(a_index_ptr, rows, rows < end, a_div, A_INDEX)
                a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            if G_TMA:
                g = g_desc.load([r0, pid_n * BLOCK_N])
            else:
                g_rows = _indexed_rows(g_index_ptr, rows, rows < end, 1, G_INDEX)
                g = tl.load(g_ptr + g_rows[:, None] * stride_gm + ns[None, :] * stride_gn, mask=n_ok[None, :], other=0.0)
            acc = _dw_step(acc, a, g, scale_ptr, rows, rows < end, SCALE, IEEE, UPCAST)
    # the rest through masked pointer loads (without descriptors: every row)
    for r0 in range(masked_from, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = rows < end
        a_rows = _indexed_rows(a_index_ptr, rows, row_ok, a_div, A_INDEX)
        g_rows = _indexed_rows(g_index_ptr, rows, row_ok, 1, G_INDEX)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptr + g_rows[:, None] * stride_gm + ns[None, :] * stride_gn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dw_step(acc, a, g, scale_ptr, rows, row_ok, SCALE, IEEE, UPCAST)
    tl.store(c_ptr + expert.to(tl.int64) * stride_ce + ks[:, None] * stride_ck + ns[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=k_ok[:, None] & n_ok[None, :])


@triton.jit
def _dw_step(acc, a, g, scale_ptr, rows, row_ok, SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a^T (scale g) for one tile of rows."""
    if SCALE:
        g = (g.to(tl.float32) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]).to(a.dtype)
    if UPCAST:
        a = a.to(tl.float32)
        g = g.to(tl.float32)
    if IEEE or UPCAST:
        acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
    else:
        acc = tl.dot(tl.trans(a), g, acc)
    return acc


@triton.jit
def _scaled_rows_kernel(x_ptr, y_ptr, scale_ptr, dot_ptr, xs_ptr, ys_ptr, rows, width, stride_x, stride_y, stride_xs, stride_ys,
                        SCALED_X: tl.constexpr, SCALED_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = r < rows
    s = tl.load(scale_ptr + r, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, width, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (c < width)[None, :]
        x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r[:, None] * stride_y + c[None, :], mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(x * y, axis=1)
        if SCALED_X:
            tl.store(xs_ptr + r[:, None] * stride_xs + c[None, :], (x * s).to(xs_ptr.dtype.element_ty), mask=ok)
        if SCALED_Y:
            tl.store(ys_ptr + r[:, None] * stride_ys + c[None, :], (y * s).to(ys_ptr.dtype.element_ty), mask=ok)
    tl.store(dot_ptr + r, dot, mask=row_ok)


# NOTE: tile sizes of at least 16 (tl.dot's minimum on sm80/sm90); the interpreter runs one config,
#       32 wide and persistent: it pays per program instance (16-wide tiles ran a tiny MoE's step
#       2.5x slower; a program a tile made the kernel tests 1.3x slower), with descriptors where
#       the launcher makes them (the tests run without them too)
_INTERPRET_FWD = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "PERSISTENT": True, "TMA": True}
_INTERPRET_DW = {"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_R": 32, "TMA": True}
# an N-major weight descriptor ([E x K, N]) needs BLOCK_K to divide K: every config's BLOCK_K divides this
_N_MAJOR_K = _INTERPRET_FWD["BLOCK_K"] if INTERPRET else 64


def _fwd_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
        (64, 256, 64, 8, 4), (128, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSISTENT": False, "TMA": False}, num_warps=warps, num_stages=stages,
                                     pre_hook=_set_blocks))
    for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSISTENT": True, "TMA": False}, num_warps=warps, num_stages=stages,
                                     pre_hook=_set_blocks))
    # the tensor memory accelerator (sm90+) loads the weight tiles, and A's where its rows are in expert order
    # (the persistent schedule won with these for the GEMMs whose A and B both come this way)
    for bm, bn, bk, warps, stages, persistent in [(128, 256, 64, 8, 3, False), (128, 256, 64, 8, 4, False), (128, 128, 64, 8, 4, False),
                                                  (64, 256, 64, 8, 4, False), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, True),
                                                  (128, 128, 64, 8, 4, True)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSISTENT": persistent, "TMA": True}, num_warps=warps,
                                     num_stages=stages, pre_hook=_set_blocks))
    assert all(_N_MAJOR_K % c.kwargs["BLOCK_K"] == 0 for c in configs)
    return configs


def _set_blocks(nargs: dict) -> None:
    """A config's tile shapes into the launch's descriptors (each config compiles for its own)."""
    if nargs["A_TMA"]:
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if nargs["B_TMA"]:
        nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]] if nargs["B_TMA"] == 1 else [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def _prune_fwd(configs, nargs, **kwargs):
    """Descriptor configs where the launcher made a descriptor, pointer configs elsewhere: each of
    the four GEMMs ran 1.03-1.16x faster through descriptors, the layer's forward + backward 1.07x
    with dW unchanged (an H200, each side autotuned among its own: `moe_kernels.py --compare-descriptors`)."""
    return [c for c in configs if c.kwargs["TMA"] == bool(kwargs["A_TMA"] or kwargs["B_TMA"])]


def _dw_configs() -> list[triton.Config]:
    configs = [
        triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br, "TMA": False}, num_warps=w, num_stages=s, pre_hook=_set_dw_blocks)
        for bk, bn, br, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                 (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (128, 128, 32, 8, 4),
                                 # deeper: an indexed loop's rows get (num_stages + 1) // 2 buffers (grouped_mm_dw)
                                 (128, 128, 64, 8, 5), (128, 128, 32, 8, 7), (128, 256, 32, 8, 6), (64, 128, 64, 4, 6)]
    ]
    # whole row tiles of the in-order operands through descriptors (sm90+; not yet timed on a GPU, so
    # the autotuner still weighs them against the pointer configs)
    configs += [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_R": br, "TMA": True}, num_warps=w, num_stages=s, pre_hook=_set_dw_blocks)
                for bk, bn, br, w, s in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (256, 128, 64, 8, 3)]]
    return configs


def _set_dw_blocks(nargs: dict) -> None:
    if nargs["A_TMA"]:
        nargs["a_desc"].block_shape = [nargs["BLOCK_R"], nargs["BLOCK_K"]]
    if nargs["G_TMA"]:
        nargs["g_desc"].block_shape = [nargs["BLOCK_R"], nargs["BLOCK_N"]]


def _prune_dw(configs, nargs, **kwargs):
    """Descriptor configs only where the launcher made a descriptor."""
    return [c for c in configs if not c.kwargs["TMA"] or kwargs["A_TMA"] or kwargs["G_TMA"]]


@functools.cache
def _tuned(kind: str):
    """The autotuned kernel for CUDA (keyed on the shapes that vary and on the fused indexing, which
    moves the best tiles), or the plain one when interpreting (the interpreter cannot autotune)."""
    if INTERPRET:
        return (_grouped_mm_kernel, _INTERPRET_FWD) if kind == "fwd" else (_grouped_dw_kernel, _INTERPRET_DW)
    if kind == "fwd":
        return triton.autotune(_fwd_configs(), key=["N", "K", "ROWS_BUCKET", "GATHER", "SCATTER", "SCALE", "A_TMA", "B_TMA"],
                               prune_configs_by={"early_config_prune": _prune_fwd})(_grouped_mm_kernel), {}
    return triton.autotune(_dw_configs(), key=["K", "N", "ROWS_BUCKET", "A_INDEX", "G_INDEX", "SCALE", "A_TMA", "G_TMA"],
                           prune_configs_by={"early_config_prune": _prune_dw})(_grouped_dw_kernel), {}


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> None:
    # the compiled kernels' dot takes one dtype (the interpreter's upcast would hide a mix)
    if a.dtype != b.dtype:
        raise TypeError(f"distrain grouped GEMM: operands in {a.dtype} and {b.dtype}; cast them to one dtype first")


@functools.cache
def _properties(device: torch.device):
    """The CUDA device's properties, read once (the launches ask for them on every call)."""
    return torch.cuda.get_device_properties(device)


def _processors(device: torch.device) -> int:
    """The persistent kernel's programs: the GPU's SMs (the interpreter: 3, so programs take several tiles)."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 3


def _rows_bucket(rows: int, num_experts: int) -> int:
    return next_power_of_2(max(1, rows // max(num_experts, 1)))


def _descriptors(a: torch.Tensor, b: torch.Tensor, gather) -> tuple:
    """(a or its descriptor, b or its descriptor, A_TMA, B_TMA) for the forward kernel: on sm90+ (and
    when interpreting), a descriptor of A where its rows are read in order, and of the weights seen
    as [E x N, K] (B_TMA 1: K contiguous, the forward's [E, out, in] read transposed) or [E x K, N]
    (2: the backward's, where BLOCK_K divides K). Block shapes are set per config (`_set_blocks`)."""
    if not _tma(a.device):
        return a, b, False, 0
    a_desc = _rows_descriptor(a) if gather is None else None
    experts, k, n = b.shape
    b_desc, b_tma = None, 0
    if b.numel() and b.stride(1) == 1 and b.stride(2) >= k and b.stride(0) == n * b.stride(2) and _aligned(b, b.stride(2)):
        b_desc, b_tma = TensorDescriptor(b, [experts * n, k], [b.stride(2), 1], [16, 16]), 1
    elif b.numel() and b.stride(2) == 1 and b.stride(1) >= n and b.stride(0) == k * b.stride(1) and k % _N_MAJOR_K == 0 and _aligned(b, b.stride(1)):
        b_desc, b_tma = TensorDescriptor(b, [experts * k, n], [b.stride(1), 1], [16, 16]), 2
    return a if a_desc is None else a_desc, b if b_desc is None else b_desc, a_desc is not None, b_tma


def _tma(device: torch.device) -> bool:
    """Whether tiles may load through descriptors (the tensor memory accelerator, sm90+; the interpreter emulates them)."""
    return INTERPRET or (device.type == "cuda" and _properties(device).major >= 9)


def _aligned(t: torch.Tensor, stride: int) -> bool:
    # the accelerator's rules: a 16-byte aligned base and strides (and a contiguous last dimension)
    return t.data_ptr() % 16 == 0 and stride * t.element_size() % 16 == 0


def _rows_descriptor(t: torch.Tensor) -> Optional[TensorDescriptor]:
    """A descriptor of row-major [rows, width] `t` (its block shape set per config), or None."""
    if t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and _aligned(t, t.stride(0)):  # (no broadcast rows)
        return TensorDescriptor(t, [t.shape[0], t.shape[1]], [t.stride(0), 1], [16, 16])
    return None


def _launch_mm(a, b, offsets, gather, gather_div: int, scatter, scale, out_rows: int) -> torch.Tensor:
    _same_dtype(a, b)
    rows = gather.numel() if gather is not None else a.shape[0]
    num_experts, k, n = b.shape
    # NOTE: zeros only where rows stay unwritten (dropped pairs): a scatter of every row (distinct
    #       entries) writes them all, and the fill would be one more pass over T x k x H
    c = (torch.zeros if scatter is not None and scatter.numel() < out_rows else torch.empty)(out_rows, n, dtype=a.dtype, device=a.device)
    kernel, fixed = _tuned("fwd")
    a_desc, b_desc, a_tma, b_tma = _descriptors(a, b, gather)
    if fixed:  # (the autotuner calls _set_blocks itself)
        _set_blocks({"a_desc": a_desc, "b_desc": b_desc, "A_TMA": a_tma, "B_TMA": b_tma, **fixed})

    def grid(meta):  # an upper bound on the M tiles of all experts, times the N tiles; persistent: one program an SM
        bound = (cdiv(rows, meta["BLOCK_M"]) + num_experts) * cdiv(n, meta["BLOCK_N"])
        return (min(bound, _processors(a.device)) if meta["PERSISTENT"] else bound,)

    kernel[grid](
        a, b, c, a_desc, b_desc, offsets if gather is None else gather, offsets if scatter is None else scatter,
        offsets if scale is None else scale, offsets, num_experts, n, k, gather_div,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), _rows_bucket(rows, num_experts),
        GATHER=gather is not None, SCATTER=scatter is not None, SCALE=scale is not None, IEEE=a.dtype == torch.float32,
        UPCAST=INTERPRET and a.dtype == torch.bfloat16, A_TMA=a_tma, B_TMA=b_tma, E_BLOCK=next_power_of_2(num_experts), **fixed,
    )
    return c


def _launch_dw(a, g, offsets, a_index, a_div: int, g_index, scale, like) -> torch.Tensor:
    _same_dtype(a, g)
    out = torch.empty_like(like)  # the weight's layout (a transposed view keeps its strides)
    num_experts, k, n = out.shape
    rows = a_index.numel() if a_index is not None else a.shape[0]
    kernel, fixed = _tuned("dw")
    # descriptors of the operands whose rows are read in expert order
    a_desc = _rows_descriptor(a) if a_index is None and _tma(a.device) else None
    g_desc = _rows_descriptor(g) if g_index is None and _tma(g.device) else None
    a_desc, g_desc, a_tma, g_tma = a if a_desc is None else a_desc, g if g_desc is None else g_desc, a_desc is not None, g_desc is not None
    if fixed:  # (the autotuner calls _set_dw_blocks itself)
        _set_dw_blocks({"a_desc": a_desc, "g_desc": g_desc, "A_TMA": a_tma, "G_TMA": g_tma, **fixed})

    def grid(meta):
        return (cdiv(k, meta["BLOCK_K"]), cdiv(n, meta["BLOCK_N"]), num_experts)

    kernel[grid](
        a, g, out, a_desc, g_desc, offsets if a_index is None else a_index, offsets if g_index is None else g_index,
        offsets if scale is None else scale, offsets, k, n, a_div,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1), out.stride(2), _rows_bucket(rows, num_experts),
        A_INDEX=a_index is not None, G_INDEX=g_index is not None, SCALE=scale is not None, IEEE=a.dtype == torch.float32,
        UPCAST=INTERPRET and a.dtype == torch.bfloat16, A_TMA=a_tma, G_TMA=g_tma, **fixed,
    )
    return out


@torch.library.custom_op("distrain::grouped_mm", mutates_args=())
def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gather: Optional[torch.Tensor], gather_div: int,
    scatter: Optional[torch.Tensor], scale: Optional[torch.Tensor], out_rows: int, sum_k: int = 1,
) -> torch.Tensor:
    """C [out_rows / sum_k, N]: row i of the expert-sorted order (expert e(i) by `offsets`) is
    `scale[i] * a[gather[i] // gather_div] @ b[e(i)]`, written to row `scatter[i]` of
    [out_rows, N] (rows no index names stay zero), whose groups of `sum_k` consecutive rows are
    then summed (the MoE layer's sum over each token's k slots). b: [E, K, N], any strides.
    `gather` / `scatter` entries are distinct."""
    out = _launch_mm(a, b, offsets, gather, gather_div, scatter, scale, out_rows)
    return out if sum_k == 1 else out.view(out_rows // sum_k, sum_k, out.shape[-1]).sum(1)  # (explicit: 0 rows happen)


@grouped_mm.register_fake
def _(a, b, offsets, gather, gather_div, scatter, scale, out_rows, sum_k=1):
    return a.new_empty(out_rows // sum_k, b.shape[-1])


@torch.library.custom_op("distrain::grouped_mm_dw", mutates_args=())
def grouped_mm_dw(
    a: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor, a_index: Optional[torch.Tensor], a_div: int,
    g_index: Optional[torch.Tensor], scale: Optional[torch.Tensor], like: torch.Tensor,
) -> torch.Tensor:
    """dW [E, K, N] shaped and laid out like `like`: for each expert e, the sum over its rows i of
    `a[a_index[i] // a_div]^T (scale[i] * g[g_index[i]])`; exact zeros for an expert without rows.

    Rows out of expert order are read one of two ways: by index inside the contraction loop, or
    from copies in expert order made first (a pass over the rows). The indexed loop needs twice the
    pipeline stages for the same depth (its indices load a stage before the rows: sm90 builds of
    Triton 3.6-3.9 hold (num_stages + 1) // 2 buffers), and with too few it ran at half speed (an
    H100). Which is faster depends on the GPU and the shapes, so on CUDA both are timed once per
    shape and the faster kept (`_fastest`); `DW_PATH` forces one."""
    if a_index is None and g_index is None:
        return _launch_dw(a, g, offsets, None, 1, None, scale, like)
    paths = {
        "indexed": lambda: _launch_dw(a, g, offsets, a_index, a_div, g_index, scale, like),
        "copied": lambda: _launch_dw(a if a_index is None else a[a_index // a_div], g if g_index is None else g[g_index],
                                     offsets, None, 1, None, scale, like),
    }
    if DW_PATH is not None:
        return paths[DW_PATH]()
    rows = (a_index if a_index is not None else g_index).numel()
    key = (a.shape[1], g.shape[1], _rows_bucket(rows, like.shape[0]), a_index is not None, g_index is not None, scale is not None, a.dtype, str(a.device))
    return _fastest(key, paths, a.device)


@grouped_mm_dw.register_fake
def _(a, g, offsets, a_index, a_div, g_index, scale, like):
    return torch.empty_like(like)


@torch.library.custom_op("distrain::scaled_rows", mutates_args=())
def scaled_rows(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, scale_x: bool, scale_y: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows x, y [R, W] and scale [R]: (the row dots <x_i, y_i> [R] in fp32, scale_i x_i,
    scale_i y_i), the scaled rows only where asked (else empty), in one pass: the backward of a
    scaled GEMM needs the routing weights' gradient and the rows scaled for dX and dW. (Eager torch
    took three: a batched GEMV for the dots, two broadcast multiplies, on an H200 0.47 + 0.32 + 0.27
    ms at 16k tokens.)"""
    rows, width = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    dot = torch.empty(rows, dtype=torch.float32, device=x.device)
    xs = x.new_empty(x.shape) if scale_x else x.new_empty(0)
    ys = y.new_empty(y.shape) if scale_y else y.new_empty(0)
    if rows:
        block_r = 16 if INTERPRET else 8
        _scaled_rows_kernel[(cdiv(rows, block_r),)](
            x, y, scale, dot, xs if scale_x else x, ys if scale_y else y, rows, width, x.stride(0), y.stride(0),
            xs.stride(0) if scale_x else 0, ys.stride(0) if scale_y else 0,
            SCALED_X=scale_x, SCALED_Y=scale_y, BLOCK_R=block_r, BLOCK_C=min(256, next_power_of_2(max(width, 16))),
        )
    return dot, xs, ys


@scaled_rows.register_fake
def _(x, y, scale, scale_x, scale_y):
    return (x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape) if scale_x else x.new_empty(0),
            y.new_empty(y.shape) if scale_y else y.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    a, b, offsets, gather, gather_div, scatter, scale, out_rows, sum_k = inputs
    ctx.save_for_backward(a, b, offsets, gather, scatter, scale)
    ctx.gather_div, ctx.sum_k = gather_div, sum_k


def _backward(ctx, grad):
    a, b, offsets, gather, scatter, scale = ctx.saved_tensors
    div, sum_k = ctx.gather_div, ctx.sum_k  # the gradient of slot scatter[i] is grad[scatter[i] // sum_k]
    # NOTE: under CUDA bf16 autocast the down GEMM's output gradient arrived in fp32 (torch 2.11,
    #       an H200), and the compiled kernels take one dtype
    grad = grad.to(b.dtype)
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_scale = scale is not None and ctx.needs_input_grad[6]
    rows = gather.numel() if gather is not None else a.shape[0]
    b_t = b.transpose(1, 2)
    # the operand rows each sorted row reads (None: in expert order already)
    a_index = None if gather is None else gather // div
    g_index = None if scatter is None else scatter // sum_k
    da = db = dscale = None
    # dW's scale goes into a copy of the narrower operand's rows (the down GEMM's: intermediate, not
    # hidden): a_i^T (s_i g_i) = (s_i a_i)^T g_i; a scale inside dW's loop routes the tile through
    # registers and makes the warpgroup MMA synchronous (sm90 build)
    scale_a = need_b and scale is not None and a.shape[1] <= grad.shape[1]
    scale_g = need_b and scale is not None and not scale_a
    if need_scale:
        # d scale[i] = <a_row(i), (g_i @ b^T)>: the unscaled dX rows in sorted order, then in one pass
        # the row dots, those rows scaled (dX) and a's rows scaled (dW's operand)
        unscaled = grouped_mm(grad, b_t, offsets, scatter, sum_k, None, None, rows)
        dots, sorted_rows, a_scaled = scaled_rows(unscaled, a if a_index is None else a[a_index], scale, need_a, scale_a)
        dscale = dots.to(scale.dtype)
        if need_a:
            da = sorted_rows if gather is None else _sum_slots(sorted_rows, gather, a.shape[0], div)
        if scale_a:
            a, a_index, scale_a = a_scaled, None, False
    elif need_a:
        if gather is None:
            da = grouped_mm(grad, b_t, offsets, scatter, sum_k, None, scale, rows)
        else:  # each row to its (token, k) slot, then the sum over k: no atomics, a fixed order
            da = grouped_mm(grad, b_t, offsets, scatter, sum_k, gather, scale, a.shape[0] * div, div)
    if need_b:
        if scale_a:
            a, a_index = (a if a_index is None else a[a_index]) * scale.unsqueeze(-1).to(a.dtype), None
        if scale_g:
            grad, g_index = (grad if g_index is None else grad[g_index]) * scale.unsqueeze(-1).to(grad.dtype), None
        db = grouped_mm_dw(a, grad, offsets, a_index, 1, g_index, None, b)
    return da, db, None, None, None, None, dscale, None, None


# "indexed" / "copied": how grouped_mm_dw reads rows out of expert order; unset: the faster,
# timed on CUDA (DISTRAIN_DW_PATH sets it for a run's workers)
DW_PATH: Optional[str] = os.environ.get("DISTRAIN_DW_PATH") or None
if DW_PATH not in (None, "indexed", "copied"):
    raise ValueError(f"DISTRAIN_DW_PATH={DW_PATH}: must be indexed or copied (or unset: the faster, timed on CUDA)")
_chosen_paths: dict[tuple, str] = {}


def _fastest(key: tuple, paths: dict, device: torch.device) -> torch.Tensor:
    """The result of the faster of equivalent `paths` (name: callable). On CUDA each runs and is
    timed once per `key` (the best of 3 runs, after one that compiles and autotunes its kernel), as
    Triton's autotuner times tile sizes, and the choice is kept for the process; elsewhere (the
    interpreter) the first runs. Only the fastest path's output stays alive (dW is E x K x N)."""
    choice = _chosen_paths.get(key)
    if choice is not None:
        return paths[choice]()
    if INTERPRET or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return next(iter(paths.values()))()
    best, best_ms, out = None, float("inf"), None
    for name, run in paths.items():
        result = run()  # compiles and autotunes its kernel
        for _ in range(3):
            del result
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)  # (the backward's other streams: the time is this path's alone)
            start.record()
            result = run()
            end.record()
            end.synchronize()
            if start.elapsed_time(end) < best_ms:
                best, best_ms, out = name, start.elapsed_time(end), result  # (frees the previous best)
        del result
    _chosen_paths[key] = best
    return out


def _sum_slots(sorted_rows: torch.Tensor, slots: torch.Tensor, tokens: int, div: int) -> torch.Tensor:
    pairs = sorted_rows.new_zeros(tokens * div, sorted_rows.shape[-1]).index_copy_(0, slots, sorted_rows)
    return pairs.view(tokens, div, pairs.shape[-1]).sum(1)


grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def reference_grouped_mm(a, b, offsets, gather=None, gather_div: int = 1, scatter=None, scale=None, out_rows: int | None = None, sum_k: int = 1) -> torch.Tensor:
    """The torch twin of `grouped_mm` (one matmul per expert), for the tests."""
    rows = a if gather is None else a[gather // gather_div]
    pieces, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        pieces.append(rows[start:end] @ b[expert])
        start = end
    out = torch.cat(pieces)
    if scale is not None:
        out = out * scale.unsqueeze(-1).to(out.dtype)
    if scatter is not None:
        out = out.new_zeros(out_rows, out.shape[-1]).index_copy(0, scatter, out)
    return out if sum_k == 1 else out.view(-1, sum_k, out.shape[-1]).sum(1)
