"""FLOPs per token and peak FLOP/s, for model FLOPs utilization (MFU).

Training FLOPs per token (forward + backward = 3 x forward, as in PaLM, appendix B):

    6 * N_active  +  12 * num_layers * num_heads * head_dim * seq_len

- N_active counts the matmul parameters one token passes through: every parameter except the input
  embedding table (a lookup, not a matmul), with each MoE expert weight scaled by
  experts_per_token / num_experts (only the routed experts run), plus the lm_head matmul
  (vocab x hidden) also when it is tied to the embedding.
- The second term is attention (scores and weighted values), counted over the full causal
  sequence of `seq_len`, not halved for causality and not reduced for packed-document masks.

MFU = tokens per second per device * FLOPs per token / peak FLOP/s per device.
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.models import ModelSpec

# Dense bf16 tensor-core peak per device (no sparsity), FLOP/s; matched by substring of the name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H800": 989e12,
    "H20": 148e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "MI300X": 1307e12,
}


def active_params(model: nn.Module, spec: ModelSpec) -> int:
    embedding = spec.embeddings.weight
    expert_names = set(spec.expert_param_names)
    total = 0.0
    for name, param in model.named_parameters():
        if param is embedding:
            continue
        count = param.numel()
        if name in expert_names:
            count *= spec.experts_per_token / spec.num_experts
        total += count
    if spec.tied_embeddings:
        total += embedding.numel()
    return int(total)


def flops_per_token(model: nn.Module, spec: ModelSpec, seq_len: int) -> float:
    config = model.config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention = 12 * config.num_hidden_layers * num_heads * head_dim * seq_len
    return 6 * active_params(model, spec) + attention


def peak_flops(device: torch.device, configured: float | None, cpu_configured: float | None = None) -> float | None:
    """Per-device peak FLOP/s: `logging.peak_flops`, else a known GPU's, else on a CPU
    `logging.cpu_peak_flops`, else None (no MFU)."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        return peak_of(torch.cuda.get_device_name(device))
    return cpu_configured if device.type == "cpu" else None


def peak_of(gpu_name: str) -> float | None:
    """A known GPU's dense bf16 peak, by the longest key its name holds ("L40" is not an "L4")."""
    key = next((k for k in sorted(GPU_PEAK_FLOPS, key=len, reverse=True) if k in gpu_name), None)
    return GPU_PEAK_FLOPS[key] if key else None
