"""The experts forward of every MoE model distrain trains, registered with transformers'
`ExpertsInterface` as "distrain" and selected through the model's `experts_implementation`.

transformers keeps what differs between models: the router, the experts module's weights and
their layout (`is_transposed`, concatenated or interleaved `gate_up`, biases, a model's own
`_apply_gate` such as GPT-OSS's clamped SwiGLU, `has_gate`, `post_expert_norm`). distrain owns how
the routed token rows reach the experts and how the GEMMs run:

1. the T x K (token, expert) pairs are sorted by expert (stable), and counted per expert;
2. one grouped GEMM for `gate_up` (rows of expert e times its weight; empty experts cost nothing),
   the model's gate, one grouped GEMM for `down`;
3. each row is weighted by its routing weight, put back in (token, k) order and summed over k
   (a sum in a fixed order, deterministic on every device, unlike an index_add).

With `moe.capacity_factor` (`configure`) each expert takes at most its capacity of rows, the
earliest in token order, before step 2; the others are dropped.

The GEMMs run on torch's `grouped_mm` (`moe.kernel=torch`) or distrain's Triton kernels
(`distrain.kernels.grouped_gemm`, `moe.kernel=triton`), which also take over steps 1's gather and
3's weighting and un-permuting into their loads and stores where the rows stay on this rank (no
EP) and the experts have no biases or post-expert norm; there transformers' default gate with SiLU
runs as one fused op (`distrain.kernels.swiglu`).

With expert parallelism (`distrain.moe.dispatch`) step 2 runs on the rank that holds the expert:
the sorted rows travel there and back by all-to-all. Under expert-TP the weights are DTensors
sharded on the intermediate dimension (`distrain.parallel.tensor_parallel`): step 2 runs on this
rank's shards, every expert for every token, and the output is this rank's partial sum, which the
MoE block's TP region reduces.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from distrain.config import ConfigError

IMPLEMENTATION = "distrain"


def register() -> None:
    """Make "distrain" a valid `experts_implementation` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """`hidden_states` [T, H], `top_k_index` / `top_k_weights` [T, K] -> [T, H]; `self` is the
    model's experts module (3-D weights, experts first)."""
    num_tokens, top_k = top_k_index.shape
    expert_of_row = top_k_index.reshape(-1)
    order = torch.argsort(expert_of_row, stable=True)  # (token, k) pairs grouped by expert
    counts = count_per_expert(expert_of_row, self.num_experts)
    capacity_factor = getattr(self, "_distrain_capacity_factor", None)
    if capacity_factor is not None:
        order, counts = _drop_over_capacity(self, order, counts, expert_of_row, capacity_factor)
    dispatcher = getattr(self, "_distrain_dispatcher", None)
    if dispatcher is None and _kernel(self) == "triton" and not self.has_bias and not self.has_post_expert_norm:
        return _fused_experts(self, hidden_states, order, counts, top_k_weights)
    if dispatcher is None:
        out = local_experts(self, hidden_states[order // top_k], counts)
    else:  # the rows come back in the dispatcher's order of (token, k) pairs
        out, order = dispatcher(self, hidden_states, order, top_k, counts)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    # back to (token, k) order; a dropped pair adds nothing
    unsorted = (out.new_zeros if capacity_factor is not None else torch.empty)(num_tokens * top_k, out.shape[-1], dtype=out.dtype, device=out.device)
    unsorted.index_copy_(0, order, out)
    return unsorted.view(num_tokens, top_k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def count_per_expert(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of `index` name each expert (int64 [num_experts]), by a scatter-add:
    `torch.bincount` reads the index's min and max back to the host (two syncs per call on CUDA,
    which would stall the CPU at every MoE layer)."""
    flat = index.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def configure(moe_blocks, capacity_factor: float | None, kernel: str, dispatch_chunks: int = 1) -> None:
    """Per experts module: `moe.capacity_factor` (see `_drop_over_capacity`; None: nothing is
    ever dropped), the GEMM kernels, "torch" or "triton" (`resolve_kernel`; with "triton" also the
    fused SwiGLU where the experts gate as transformers' default does), and under expert
    parallelism the pieces each exchange is split into (`moe.dispatch_chunks`)."""
    for block in moe_blocks:
        block.experts._distrain_capacity_factor = capacity_factor
        block.experts._distrain_kernel = kernel
        block.experts._distrain_swiglu = kernel == "triton" and _plain_swiglu(block.experts)
        block.experts._distrain_dispatch_chunks = dispatch_chunks


def resolve_kernel(kernel: str, device_type: str) -> str:
    """`moe.kernel` on `device_type`: auto is Triton on CUDA (where triton is installed), torch
    elsewhere; triton off CUDA runs only under Triton's interpreter (TRITON_INTERPRET=1)."""
    if kernel == "torch" or (kernel == "auto" and device_type != "cuda"):
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if kernel == "auto":
            return "torch"
        raise ConfigError("moe.kernel=triton: the triton package is not installed; pip install triton, or use moe.kernel=torch") from None
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"moe.kernel=triton runs distrain's Triton kernels on CUDA GPUs and this run is on the {device_type} (run.device); "
            "use moe.kernel=auto or torch, or set TRITON_INTERPRET=1 to run them under Triton's interpreter (slow: tests only)"
        )
    return "triton"


def _kernel(self) -> str:
    return getattr(self, "_distrain_kernel", "torch")


def _fused_experts(self, hidden_states, order, counts, top_k_weights) -> torch.Tensor:
    """The Triton path with the permutations inside the GEMMs: `gate_up` reads the token rows in
    expert order by index (no permuted copy), `down` scales each row by its routing weight and
    writes it to its (token, k) slot (dropped pairs stay zero) and sums each token's slots."""
    from distrain.kernels.grouped_gemm import grouped_mm as triton_grouped_mm

    num_tokens, top_k = top_k_weights.shape
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    gate_up = _as_in_out(self, _local(self.gate_up_proj if self.has_gate else self.up_proj))
    dtype = _compute_dtype(hidden_states, gate_up)
    out = _gate(self, triton_grouped_mm(hidden_states.to(dtype), gate_up.to(dtype), offsets, order, top_k, None, None, order.numel()))
    down = _as_in_out(self, _local(self.down_proj)).to(dtype)
    weights = top_k_weights.reshape(-1)[order].to(dtype)
    return triton_grouped_mm(out.to(dtype), down, offsets, None, 1, order, weights, num_tokens * top_k, top_k).to(hidden_states.dtype)


def _as_in_out(self, weight: torch.Tensor) -> torch.Tensor:
    """Expert weights as [E, in, out] (a view)."""
    return weight if self.is_transposed else weight.transpose(-2, -1)


def _drop_over_capacity(self, order, counts, expert_of_row, capacity_factor: float):
    """Keep the first `capacity` rows of each expert in `order` (stable: token order); records
    the number dropped in `self._distrain_dropped` for the router statistics."""
    capacity = math.ceil(capacity_factor * expert_of_row.numel() / self.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_of_row[order]]
    kept = rank_in_expert < capacity
    self._distrain_dropped = (~kept).sum()
    return order[kept], counts.clamp(max=capacity)


def local_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts' MLPs on `rows` sorted by expert, `counts[i]` rows for the i-th expert the
    module's weights hold (all of them, or this rank's share under expert parallelism)."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    expert_of_row = None
    if self.has_bias:
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts, output_size=rows.shape[0])
    weight = _local(self.gate_up_proj if self.has_gate else self.up_proj)
    bias = _local(self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    out = _gate(self, _grouped_linear(rows, _as_in_out(self, weight), offsets, bias, expert_of_row, _kernel(self)))
    down_bias = _local(self.down_proj_bias) if self.has_bias else None
    out = _grouped_linear(out, _as_in_out(self, _local(self.down_proj)), offsets, down_bias, expert_of_row, _kernel(self))
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    return out


def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    """The model's gate (or activation) on the `gate_up` GEMM's output. On the Triton path
    transformers' default gate with SiLU, `silu(gate) * up` on the two halves, runs as one fused op
    (`distrain.kernels.swiglu`: one pass each way instead of five over strided halves)."""
    if not self.has_gate:
        return self.act_fn(gate_up)
    if getattr(self, "_distrain_swiglu", False):  # (decided once, in `configure`)
        from distrain.kernels.swiglu import swiglu

        return swiglu(gate_up)
    return self._apply_gate(gate_up)


def _plain_swiglu(experts) -> bool:
    """Whether the experts gate with transformers' default `_apply_gate` (halves, not interleaved;
    no clamp) and a plain SiLU."""
    from transformers import activations
    from transformers.integrations import moe

    default = getattr(moe, "_default_apply_gate", None)
    silu = {torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU)}
    return (default is not None and getattr(type(experts), "_apply_gate", None) is default and experts.has_gate
            and type(getattr(experts, "act_fn", None)) in silu)


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _grouped_linear(x, weight, offsets, bias, expert_of_row, kernel: str) -> torch.Tensor:
    """x [S, in] -> [S, out] with expert weights [E, in, out]."""
    if kernel == "triton":
        from distrain.kernels.grouped_gemm import grouped_mm as triton_grouped_mm

        dtype = _compute_dtype(x, weight)
        out = triton_grouped_mm(x.to(dtype), weight.to(dtype), offsets, None, 1, None, None, x.shape[0])
    else:
        out = grouped_mm(x, weight, offsets)
    if bias is not None:
        out = out + bias[expert_of_row]
    return out


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows `offsets[e-1]:offsets[e]` of x [S, in] times weight[e] [in, out] -> [S, out]:
    `torch.nn.functional.grouped_mm` where its layout rules hold (16-byte aligned strides and
    addresses), else one matmul per expert. Every row belongs to an expert (offsets[-1] == S)."""
    dtype = _compute_dtype(x, weight)
    x, weight = x.to(dtype), weight.to(dtype)
    if _grouped_mm_ok(x, weight):
        return F.grouped_mm(x, weight, offs=offsets)
    pieces, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        pieces.append(x[start:end] @ weight[expert])
        start = end
    return torch.cat(pieces) if pieces else x.new_empty(0, weight.shape[-1])


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's where it is on (grouped_mm and distrain's custom ops are not
    autocast-aware), else the (mixed-precision) weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    if x.device.type == "cuda" and (torch.cuda.get_device_capability(x.device) < (8, 0) or x.dtype != torch.bfloat16):
        return False  # CUDA's grouped_mm: bf16 on sm80+
    size = x.element_size()
    for t in (x, weight):
        if t.data_ptr() % 16 or any(s % (16 // size) for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
            return False
    return x.shape[0] > 0
