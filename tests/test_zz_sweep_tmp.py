import pytest, torch
from test_parallel import common_args, assert_same_run, LAYOUTS, SMALL

ARCHS = {
    "olmo2": dict(SMALL, num_key_value_heads=4),
    "gemma2": dict(SMALL, head_dim=16),
    "gemma3_text": dict(SMALL, head_dim=16),
    "qwen2": dict(SMALL),
    "granite": dict(SMALL),
    "cohere": dict(SMALL, num_key_value_heads=4),
    "starcoder2": dict(SMALL),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "smollm3": dict(SMALL),
    "glm4": dict(SMALL, head_dim=16),
    "olmo3": dict(SMALL, num_key_value_heads=4),
    "exaone4": dict(SMALL, head_dim=16),
    "qwen3_next": dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, head_dim=16,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "lfm2_moe": dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=0),
    "flex_olmo": dict(SMALL, num_experts=4, num_experts_per_tok=2, num_key_value_heads=4),
}
SWEEP = ["tp=2 sp", "dp_shard=2 x tp=2", "dp_replicate=2 x dp_shard=2", "tp=4 sp"]
MOE_SWEEP = ["ep=2", "tp=2 x ep=2"]

@pytest.mark.parametrize("arch", list(ARCHS))
def test_sweep(tmp_path, ranks, data_cache, arch):
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = tmp_path / "model"
    try:
        config = AutoConfig.for_model(arch, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **ARCHS[arch])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    except Exception as e:
        open("/tmp/ov/sweep2.txt", "a").write(f"{arch} BUILD {type(e).__name__}: {str(e)[:200]}\n"); return
    ref = tmp_path / "ref"
    try:
        ranks.train(common_args(folder, data_cache, ref))
    except Exception as e:
        open("/tmp/ov/sweep2.txt", "a").write(f"{arch} REF {str(e)[-400:]}\n"); return
    layouts = SWEEP + (MOE_SWEEP if "num_experts" in ARCHS[arch] else [])
    for name in layouts:
        run = tmp_path / name.replace(" ", "").replace("=", "")
        try:
            ranks.train([*common_args(folder, data_cache, run), *LAYOUTS[name]])
            assert_same_run(ref, run)
            res = "ok"
        except Exception as e:
            msg = str(e)
            lines = [l for l in msg.splitlines() if "Error" in l or "error" in l or "assert" in l.lower()]
            res = "FAIL " + (" | ".join(lines[-3:]) if lines else msg[-300:])[:400]
        open("/tmp/ov/sweep2.txt", "a").write(f"{arch} {name}: {res}\n")
