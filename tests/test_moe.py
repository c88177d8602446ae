"""distrain's MoE experts layer against transformers' own eager experts loop, in one process."""

from __future__ import annotations

import math

import pytest
import torch

SIZES = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
# architecture -> config keys: routing and experts of each family (top-k softmax, shared expert with a
# sigmoid gate, biases + transposed interleaved gate_up + clamped gate, sigmoid router with correction bias)
MODELS = {
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32),
    "qwen3_moe_odd": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=30, hidden_size=60, head_dim=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                        n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


def moe_module(name: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distrain.models import discover_spec
    from distrain.moe import experts

    experts.register()
    arch = name.removesuffix("_odd")
    config = AutoConfig.for_model(arch, **{**SIZES, **MODELS[name]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager", dtype=torch.float32)
    block = discover_spec(model).moe_blocks[0]
    with torch.no_grad():
        bias = getattr(block.router, "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(0, 0.1)
    return model, block


def run(model, block, implementation: str, x: torch.Tensor):
    model.config._experts_implementation = implementation
    x = x.clone().requires_grad_()
    out = block.module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    grads = {n: p.grad.clone() for n, p in block.module.named_parameters() if p.grad is not None}
    block.module.zero_grad()
    return out.detach(), x.grad, grads


def routed_counts(block, x) -> torch.Tensor:
    captured = {}

    def hook(module, args, kwargs, output):
        captured["index"] = args[1] if len(args) > 1 else kwargs["top_k_index"]

    handle = block.experts.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        block.module(x)
    handle.remove()
    return torch.bincount(captured["index"].reshape(-1), minlength=block.experts.num_experts)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_experts_layer_matches_eager_loop(name, routing, kernel):
    """moe.kernel=triton runs distrain's Triton kernels under the interpreter here: fused with the
    gather and scatter (Qwen3-MoE, Mixtral, the shared-expert models), or plain grouped GEMMs
    beside the experts' biases (GPT-OSS)."""
    from conftest import OpCounter

    from distrain.moe.experts import configure

    model, block = moe_module(name)
    configure([block], None, kernel)
    x = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).abs()
    with torch.no_grad():
        block.router.weight[0] = -1.0  # never expert 0: an empty expert in every case
        if routing == "one_expert":  # every token's first choice is expert 3
            block.router.weight[1:] = 0.0
            block.router.weight[3] = 1.0
            if getattr(block.router, "bias", None) is not None:
                block.router.bias.zero_()
    counts = routed_counts(block, x)
    assert counts[0] == 0, counts
    if routing == "one_expert":
        assert counts[3] == x.shape[0] * x.shape[1], counts
    reference = run(model, block, "eager", x)
    with OpCounter() as ops:
        ours = run(model, block, "distrain", x)
    # forward: gate_up and down; backward: dX of both, dW of both (the routing weights' gradient
    # of the fused down GEMM takes one more)
    assert (ops.calls["distrain.grouped_mm"] + ops.calls["distrain.grouped_mm_dw"] >= 6) == (kernel == "triton"), ops.calls
    # transformers' default gate with SiLU runs fused on the Triton path (GPT-OSS keeps its own clamped gate)
    fused_gate = kernel == "triton" and name != "gpt_oss"
    assert (ops.calls["distrain.swiglu"], ops.calls["distrain.swiglu_backward"]) == ((1, 1) if fused_gate else (0, 0)), ops.calls
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6)
    assert ours[2].keys() == reference[2].keys() and block.router_name + ".weight" in ours[2]
    for key in reference[2]:
        torch.testing.assert_close(ours[2][key], reference[2][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_capacity_drops_the_latest_pairs_over_capacity(name, kernel):
    """moe.capacity_factor: against the eager loop with the routing weights of the pairs over
    each expert's capacity (the latest in token order) set to zero."""
    from distrain.moe.experts import configure

    model, block = moe_module(name)
    x = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    num_experts, factor = block.experts.num_experts, 0.5
    counts = routed_counts(block, x)
    capacity = math.ceil(factor * counts.sum().item() / num_experts)

    def zero_dropped(module, args, kwargs):
        index, weights = (args[1], args[2]) if len(args) > 2 else (kwargs["top_k_index"], kwargs["top_k_weights"])
        flat = index.reshape(-1)
        seen = torch.zeros(num_experts, dtype=torch.long)
        keep = torch.ones(flat.numel(), dtype=weights.dtype)
        for i, expert in enumerate(flat.tolist()):  # (token, k) order: the earliest pairs are kept
            keep[i] = float(seen[expert] < capacity)
            seen[expert] += 1
        return (args[0], index, weights * keep.view_as(weights)), {}

    handle = block.experts.register_forward_pre_hook(zero_dropped, with_kwargs=True)
    reference = run(model, block, "eager", x)
    handle.remove()
    configure([block], factor, kernel)
    ours = run(model, block, "distrain", x)
    expected_dropped = (counts - capacity).clamp(min=0).sum().item()
    assert expected_dropped > 0 and block.experts._distrain_dropped.item() == expected_dropped, (counts, capacity)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6)
    for key in reference[2]:
        torch.testing.assert_close(ours[2][key], reference[2][key], rtol=1e-5, atol=1e-6, msg=key)


def test_discovery_reads_each_family():
    from distrain.models import discover_spec

    expected = {  # name -> (experts, top-k, router, has shared expert, has shared gate)
        "qwen3_moe": (16, 4, "gate", False, False),
        "mixtral": (8, 2, "gate", False, False),
        "qwen2_moe": (8, 2, "gate", True, True),
        "gpt_oss": (8, 2, "router", False, False),
        "deepseek_v3": (8, 2, "gate", True, False),
    }
    for name, (experts, top_k, router, shared, gate) in expected.items():
        model, block = moe_module(name)
        spec = discover_spec(model)
        assert len(spec.moe_blocks) == model.config.num_hidden_layers, name
        assert (spec.num_experts, spec.experts_per_token, block.router_name) == (experts, top_k, router), name
        assert (block.shared_expert is not None, block.shared_gate is not None) == (shared, gate), name
        assert spec.expert_param_names and all(".experts." in n for n in spec.expert_param_names)


def _saved_deepseek(folder, skew: float):
    """A tiny DeepSeek-V3 whose routers' correction biases favour experts 0 and 1 by `skew`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {**SIZES, **MODELS["deepseek_v3"], "vocab_size": 1024, "max_position_embeddings": 256, "num_key_value_heads": 4,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3", **sizes))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias[:2] = skew
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_bias_update_balances_a_skewed_router(tmp_path, data_cache):
    from conftest import check_ok, read_metrics, run_cli, run_cli_here

    model = _saved_deepseek(tmp_path / "model", skew=0.1)
    common = ["train", "recipe=qwen3_moe_debug", "model=pretrained", f"model.name_or_path={model}", "data.vocab_size=1024",
              "data.max_bytes=600000", f"data.cache_dir={data_cache}", "train.seq_len=32", "train.global_batch_size=4",
              "train.micro_batch_size=4", "train.steps=60", "eval.interval=0", "checkpoint.interval=0", "checkpoint.export=false",
              "model.attn_implementation=eager"]
    worst = {}
    for rate in (0.0, 0.005):
        run_dir = tmp_path / f"rate{rate}"
        check_ok(run_cli([*common, f"moe.bias_update_rate={rate}", f"run.dir={run_dir}"], tmp_path))
        records = read_metrics(run_dir)
        worst[rate] = [max(r["moe_max_mean_load"]) for r in records]
    last = {rate: sum(values[-20:]) / 20 for rate, values in worst.items()}
    assert worst[0.0][0] > 3 and worst[0.005][0] > 3, worst  # experts 0 and 1 take most tokens at first
    assert last[0.0] > 3, worst[0.0]  # without updates they keep them
    assert last[0.005] < 2.5, worst[0.005]  # with updates the load evens out

    # a rate on routers without a correction bias is refused before any worker starts
    refused = run_cli_here(["train", "recipe=qwen3_moe_debug", "moe.bias_update_rate=0.001"], tmp_path)
    assert refused.returncode == 2 and "e_score_correction_bias" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


@pytest.mark.slow
def test_triton_kernels_train_like_torch(tmp_path, ranks, tiny):
    """moe.kernel=triton (under the interpreter here) against moe.kernel=torch, 3 steps of a tiny
    Qwen3-MoE in fp32: in one process (the fused gather / scatter path) and under EP (plain
    grouped GEMMs on the rows each rank received)."""
    from conftest import read_metrics

    common = ["recipe=qwen3_moe_debug", *tiny, "train.steps=3", "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=1",
              "eval.interval=0", "checkpoint.interval=0",
              "checkpoint.export=false", "moe.aux_loss_coef=0"]
    for layout in ([], ["launcher.nproc_per_node=2", "parallel.ep=2"]):
        runs = {}
        for kernel in ("torch", "triton"):
            run_dir = tmp_path / f"{kernel}{len(layout)}"
            ranks.train([*common, *layout, f"moe.kernel={kernel}", f"run.dir={run_dir}"])
            runs[kernel] = read_metrics(run_dir)
        assert len(runs["triton"]) == 3
        for a, b in zip(runs["torch"], runs["triton"], strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (layout, a, b)


def test_triton_on_a_cpu_without_the_interpreter_exits_2(tmp_path):
    from conftest import run_cli

    proc = run_cli(["train", "recipe=qwen3_moe_debug", "moe.kernel=triton", "run.device=cpu"], tmp_path, unset=("TRITON_INTERPRET",))
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_selective_checkpointing_keeps_the_gemms_and_recomputes_the_gate():
    """Selective activation checkpointing keeps the grouped GEMMs' outputs and recomputes the
    fused SwiGLU from its saved input, as it recomputed the eager silu and product (keeping h too
    would hold another R x I per MoE layer)."""
    from torch.utils.checkpoint import CheckpointPolicy

    import distrain.kernels.swiglu  # noqa: F401 (registers the ops)
    from distrain.parallel.parallelize import selective_policy

    ops = torch.ops.distrain
    assert [selective_policy(None, op) for op in (ops.grouped_mm.default, ops.grouped_mm_dw.default, torch.ops.aten.mm.default)] == [
        CheckpointPolicy.MUST_SAVE] * 3
    assert [selective_policy(None, op) for op in (ops.swiglu.default, ops.swiglu_backward.default, torch.ops.aten.silu.default)] == [
        CheckpointPolicy.PREFER_RECOMPUTE] * 3
