"""LR schedules at their corners, the MFU FLOP count against a count by hand, and the parameters
weight decay applies to."""

from __future__ import annotations

import pytest
import torch

from distrain.config.schema import ModelConfig, OptimConfig
from distrain.metrics.flops import active_params, flops_per_token
from distrain.models import build_config, build_meta_model
from distrain.train.schedule import lr_multiplier


def test_warmup_then_cosine():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.1)


def test_warmup_stable_decay():
    cfg = OptimConfig(schedule="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_ratio=0.2)
    assert lr_multiplier(4, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(79, 100, cfg) == 1.0  # stable until the last 20 steps
    assert lr_multiplier(80, 100, cfg) == pytest.approx(1 - 1 / 20)
    assert lr_multiplier(89, 100, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, cfg) == pytest.approx(0.0)


def test_moe_flops_count_only_active_experts():
    sizes = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 tie_word_embeddings=False)
    cfg = ModelConfig(architecture="qwen3_moe", config=sizes)
    model, spec = build_meta_model(cfg, build_config(cfg))
    H, I, V, L, E, K = 64, 32, 1000, 3, 8, 2
    attention = H * 4 * 16 + 2 * H * 2 * 16 + 4 * 16 * H + 2 * 16  # q, k, v, o, q_norm + k_norm
    experts = 3 * H * I * K  # gate, up, down of the K routed experts
    per_layer = attention + experts + H * E + 2 * H  # + router + two norms
    expected = L * per_layer + H + V * H  # + final norm + lm_head (the embedding is a lookup)
    assert active_params(model, spec) == expected
    assert flops_per_token(model, spec, seq_len=128) == 6 * expected + 12 * L * 4 * 16 * 128


def test_tied_lm_head_is_counted_once_as_a_matmul():
    sizes = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, tie_word_embeddings=True)
    cfg = ModelConfig(architecture="llama", config=sizes)
    model, spec = build_meta_model(cfg, build_config(cfg))
    assert spec.tied_embeddings
    total = sum(p.numel() for p in model.parameters())  # the tied table appears once
    assert active_params(model, spec) == total  # embedding excluded, lm_head matmul included


def test_a_recipes_cpu_peak_applies_on_cpu_runs_only(monkeypatch):
    """qwen3_moe_debug's CPU figure (1.7e11) on an H200 gave an MFU of 120-250%: a CPU peak applies
    to CPU runs; a GPU takes the table; logging.peak_flops is this device's, whatever it is."""
    from distrain.config import load_job
    from distrain.metrics.flops import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    logging = load_job("qwen3_moe_debug", []).logging
    assert logging.peak_flops is None and logging.cpu_peak_flops == 1.7e11
    assert peak_flops(torch.device("cpu"), logging.peak_flops, logging.cpu_peak_flops) == 1.7e11
    assert peak_flops(torch.device("cuda", 0), logging.peak_flops, logging.cpu_peak_flops) == 989e12
    assert peak_flops(torch.device("cuda", 0), 5e14, 1.7e11) == 5e14 and peak_flops(torch.device("cpu"), 5e14, 1.7e11) == 5e14
    assert peak_flops(torch.device("cpu"), None, None) is None


def test_peak_flops_by_gpu_name():
    """The longest known name a GPU's name holds: an L40 is not an L4, an H100 NVL not an H100 SXM,
    an H20 not an H200; unknown GPUs have no peak (no MFU rather than a wrong one)."""
    from distrain.metrics.flops import peak_of

    assert peak_of("NVIDIA H100 80GB HBM3") == 989e12 and peak_of("NVIDIA H100 NVL") == 835e12 and peak_of("NVIDIA H100 PCIe") == 756e12
    assert peak_of("NVIDIA L40") == 181e12 and peak_of("NVIDIA L40S") == 362e12 and peak_of("NVIDIA L4") == 121e12
    assert peak_of("NVIDIA H20") == 148e12 and peak_of("NVIDIA H200") == 989e12 and peak_of("NVIDIA GH200 480GB") == 989e12
    assert peak_of("NVIDIA GeForce GTX 1080") is None


@pytest.mark.parametrize("decay_1d", [False, True], ids=["default", "decay_norms_and_biases"])
def test_norms_and_biases_get_no_weight_decay(decay_1d):
    """AdamW's decay shrinks matrices (and embeddings) by lr x weight_decay a step; norm gains and
    biases keep their values unless optim.decay_norms_and_biases (Megatron-LM's and HF Trainer's
    default). A step with zero gradients is the decay alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distrain.train.trainer import _decayed, _hyperparameters, _param_groups

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    optim = OptimConfig(lr=0.1, weight_decay=0.5, decay_norms_and_biases=decay_1d)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(_param_groups(model, optim), lr=optim.lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    one_d = [name for name, p in model.named_parameters() if p.ndim == 1]
    assert any(name.endswith("q_proj.bias") for name in one_d) and any("norm" in name for name in one_d)
    for name, p in model.named_parameters():
        shrink = 1 - 0.1 * 0.5 if (p.ndim >= 2 or decay_1d) else 1.0
        torch.testing.assert_close(p.detach(), before[name] * shrink, msg=name)
    # a resume applies the config's hyperparameters group by group, the same split
    names = {p: name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        group["weight_decay"] = 9.0
        group.update(_hyperparameters(_decayed(names[group["params"][0]], group["params"][0], optim), optim))
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == ([0.5] if decay_1d else [0.0, 0.5])
    # biases stacked per expert (GPT-OSS's [E, N]) are biases too
    assert not _decayed("model.layers.0.mlp.experts.down_proj_bias", torch.zeros(4, 8), OptimConfig())
    assert _decayed("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 8, 8), OptimConfig())
