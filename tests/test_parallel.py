"""Layouts against a single-process reference, through the CLI, on a model saved to a folder.

Every layout must reproduce the reference's per-step loss (1e-5), grad norm (1e-5 relative) and
final parameters (1e-5) over 20 steps, starting from the same weights and the same data.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from conftest import check_ok, read_metrics, run_cli, run_cli_here

STEPS = 10
MULTI = {"OMP_NUM_THREADS": "1"}

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
ARCHITECTURES = {
    "llama": dict(SMALL, num_key_value_heads=4),  # 4 key/value heads: tp=4 fits
    "qwen3": dict(SMALL, head_dim=16),  # q_norm / k_norm: partial gradients under TP
    "mistral": dict(SMALL),
    "qwen3_moe": dict(SMALL, head_dim=16, **MOE),
    "mixtral": dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(SMALL, head_dim=16, tie_word_embeddings=True),  # tied embeddings
    "phi3": dict(SMALL, num_key_value_heads=4),  # fused qkv_proj and gate_up_proj
    "stablelm": dict(SMALL),  # declares no TP plan: the structural one
    "qwen2_moe": dict(SMALL, **MOE, shared_expert_intermediate_size=64),  # a shared expert inside the MoE block
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),  # no TP plan and a fused query_key_value
    "phi": dict(SMALL),  # rowwise projections and an lm_head with a bias
    # (model type without the 4) 4 layers of about 0.16 MB: parallel.fsdp_unit_mb=0.2 makes two FSDP units of 2 blocks
    "llama4": dict(SMALL, num_key_value_heads=4, num_hidden_layers=4),
    "qwen3_moe4": dict(SMALL, head_dim=16, **MOE, num_hidden_layers=4),
    # its lm_head is `embed_out` on disk: a renaming transformers keys on the model's class name (FSDP renames the class)
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    # q_norm / k_norm over the whole gathered projection output (colwise_gather_output): whole gradients under SP
    "olmoe": dict(SMALL, num_experts=4, num_experts_per_tok=2),
    # a shared expert the model calls after its experts: run inside the dispatch all-to-all under EP
    "deepseek_v3": dict(SMALL, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                        n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}

LAYOUTS = {
    "dp_shard=4": ["launcher.nproc_per_node=4", "parallel.dp_shard=4"],
    "dp_replicate=2 x dp_shard=2": ["launcher.nproc_per_node=4", "parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "tp=2": ["launcher.nproc_per_node=2", "parallel.tp=2"],
    "tp=2 sp": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true"],
    "dp_shard=2 x tp=2": ["launcher.nproc_per_node=4", "parallel.dp_shard=2", "parallel.tp=2"],
    # (the test models are small enough to make one FSDP unit of all blocks; fsdp_unit_mb=0: one per block)
    "dp_shard=2 x tp=2 sp": ["launcher.nproc_per_node=4", "parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true", "parallel.fsdp_unit_mb=0"],
    "tp=4 sp": ["launcher.nproc_per_node=4", "parallel.tp=4", "parallel.sp=true"],
    "dp_shard=2 full AC": ["launcher.nproc_per_node=2", "parallel.dp_shard=2", "parallel.activation_checkpointing=full", "parallel.fsdp_unit_mb=0"],
    "tp=2 sp selective AC": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true", "parallel.activation_checkpointing=selective", "parallel.fsdp_unit_mb=0"],
    "tp=2 selective AC": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.activation_checkpointing=selective"],
    "dp_shard=2 no reshard": ["launcher.nproc_per_node=2", "parallel.dp_shard=2", "parallel.reshard_after_forward=false", "parallel.fsdp_unit_mb=0"],
    # units of 2 blocks (4-layer models): the first resharded after forward, the last not
    "dp_shard=2 units of 2 full AC": ["launcher.nproc_per_node=2", "parallel.dp_shard=2", "parallel.fsdp_unit_mb=0.2", "parallel.activation_checkpointing=full"],
    "dp_replicate=2 x dp_shard=2 x ep=2 units of 2 selective AC": [
        "launcher.nproc_per_node=4", "parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2", "parallel.fsdp_unit_mb=0.2",
        "parallel.activation_checkpointing=selective",
    ],
    "ep=2": ["launcher.nproc_per_node=2", "parallel.ep=2"],
    # one FSDP unit for every block's experts: its post-backward hook registered once per forward, again per recompute
    "ep=2 selective AC": ["launcher.nproc_per_node=2", "parallel.ep=2", "parallel.activation_checkpointing=selective"],
    "ep=2 in 2 pieces full AC": ["launcher.nproc_per_node=2", "parallel.ep=2", "moe.dispatch_chunks=2", "parallel.activation_checkpointing=full",
                                 "parallel.fsdp_unit_mb=0"],
    "ep=2 in 2 pieces": ["launcher.nproc_per_node=2", "parallel.ep=2", "moe.dispatch_chunks=2"],
    # 1 expert per rank, its rows in 3 pieces (pieces of an expert with fewer than 3 rows are empty)
    "dp_shard=4 x ep=4 in 3 pieces selective AC": ["launcher.nproc_per_node=4", "parallel.dp_shard=4", "parallel.ep=4", "moe.dispatch_chunks=3",
                                                   "parallel.activation_checkpointing=selective", "parallel.fsdp_unit_mb=0"],
    "dp_shard=4 x ep=2 selective AC": ["launcher.nproc_per_node=4", "parallel.dp_shard=4", "parallel.ep=2", "parallel.activation_checkpointing=selective", "parallel.fsdp_unit_mb=0"],
    "ep=4": ["launcher.nproc_per_node=4", "parallel.ep=4"],
    "dp_shard=4 x ep=2": ["launcher.nproc_per_node=4", "parallel.dp_shard=4", "parallel.ep=2"],
    "tp=2 x ep=2": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.ep=2"],
    "tp=2 x ep=2 selective AC": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.ep=2", "parallel.activation_checkpointing=selective",
                                 "parallel.fsdp_unit_mb=0"],
    "tp=2 sp x ep=2": ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true", "parallel.ep=2"],
    "dp_shard=2 x tp=2 sp x ep=4": ["launcher.nproc_per_node=4", "parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true", "parallel.ep=4"],
    "dp_replicate=2 x dp_shard=2 x ep=2": ["launcher.nproc_per_node=4", "parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2", "parallel.fsdp_unit_mb=0"],
    # gradient accumulation: the replicas' all-reduce once per step; grad_sync=step: FSDP reduces once per step
    "dp_replicate=2 x dp_shard=2 accumulating": ["launcher.nproc_per_node=4", "parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch_size=1", "eval.batches=6"],
    "dp_shard=2 x tp=2 sp grad_sync=step": [
        "launcher.nproc_per_node=4", "parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true", "train.micro_batch_size=1", "eval.batches=6", "parallel.grad_sync=step",
    ],
    "dp_replicate=2 x dp_shard=2 x ep=2 grad_sync=step": [
        "launcher.nproc_per_node=4", "parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2", "train.micro_batch_size=1", "eval.batches=6", "parallel.grad_sync=step",
    ],
}
FSDP_ONLY = ["dp_shard=4", "dp_replicate=2 x dp_shard=2"]
CASES = [
    ("llama", [name for name in LAYOUTS if name not in ("tp=2", "tp=2 selective AC") and "ep=" not in name and "units of 2" not in name]),
    ("llama4", ["dp_shard=2 units of 2 full AC"]),
    ("qwen3_moe4", ["dp_replicate=2 x dp_shard=2 x ep=2 units of 2 selective AC"]),
    ("qwen3", ["tp=2", "dp_shard=2 x tp=2 sp"]),
    ("mistral", ["dp_shard=2 x tp=2"]),
    ("gemma", [*FSDP_ONLY, "tp=2 sp"]),  # tied embedding and lm_head: one vocab-sharded tensor
    ("qwen3_moe", [*FSDP_ONLY, "tp=2", "dp_shard=2 x tp=2 sp", "tp=2 selective AC"]),  # expert-TP: packed gate_up
    # experts split, all-to-all dispatch; HSDP of the experts (ep=4 and tp=2 x ep=2: with the aux loss on,
    # in test_aux_loss_layouts_match_single_process; "ep=2" is dp_shard=2 x ep=2 on 2 ranks)
    ("qwen3_moe EP", ["ep=2", "dp_shard=4 x ep=2", "tp=2 sp x ep=2", "dp_replicate=2 x dp_shard=2 x ep=2", "dp_shard=2 x tp=2 sp x ep=4",
                      "dp_replicate=2 x dp_shard=2 x ep=2 grad_sync=step", "ep=2 in 2 pieces", "dp_shard=4 x ep=4 in 3 pieces selective AC"]),
    ("mixtral", [*FSDP_ONLY, "tp=2 sp"]),
    ("mixtral EP", ["ep=2", "ep=4", "dp_shard=4 x ep=2", "tp=2 x ep=2", "tp=2 sp x ep=2", "dp_replicate=2 x dp_shard=2 x ep=2"]),
    ("phi3", [*FSDP_ONLY, "tp=2 sp"]),  # fused qkv / gate_up: gathered output, split input
    ("stablelm", ["tp=2 sp"]),
    ("qwen2_moe", ["tp=2 sp", "dp_shard=2 x tp=2", "ep=2"]),  # a shared expert and its gate inside the MoE block
    # a shared expert called after the experts, run in the dispatch's window (under TP x EP too); selective
    # AC recomputes the experts (a nested FSDP unit) before their pre-backward hook has run; MLA attention
    # left whole by its TP plan (under SP: gathered in, sliced out); with one FSDP unit per block, the
    # attention (and under TP x EP the shared expert) TP leaves whole resharded after each block's forward
    ("deepseek_v3", ["ep=2 in 2 pieces full AC", "dp_shard=4 x ep=2 selective AC", "ep=2 selective AC", "dp_shard=2 x tp=2 sp",
                     "tp=2 x ep=2 selective AC", "tp=2 sp selective AC"]),
    ("phi", ["tp=2 sp", "dp_shard=2 x tp=2"]),
    ("olmoe", ["tp=2 sp"]),
    ("gpt_neox", ["dp_replicate=2 x dp_shard=2", "tp=2 sp"]),
]


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    folders = {}
    for architecture, sizes in ARCHITECTURES.items():
        config = AutoConfig.for_model(architecture.rstrip("4"), vocab_size=1024, max_position_embeddings=256, **{"tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **sizes})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / architecture)
        folders[architecture] = root / architecture
    return folders


# NOTE: optim.eps=1e-6: rows of the embedding whose tokens are rare get gradients near zero, where
#       Adam's update g / (sqrt(v) + eps) turns reduction-order noise (1e-8) into full-size steps;
#       a larger eps keeps such rows within 1e-5 of the reference without hiding real errors.
def common_args(model_dir: Path, data_cache: Path, run_dir: Path) -> list[str]:
    return [
        "recipe=qwen3_moe_debug", "model=pretrained", f"model.name_or_path={model_dir}",
        "data.vocab_size=1024", "data.max_bytes=600000", f"data.cache_dir={data_cache}",
        "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", f"train.steps={STEPS}",
        "optim.lr=1e-3", "optim.eps=1e-6", "optim.warmup_steps=2", f"eval.interval={STEPS}", "eval.batches=3", "checkpoint.interval=0", "checkpoint.export=false",
        f"run.dir={run_dir}",
        # the load-balancing loss balances each micro-batch of all data-parallel ranks together, so it
        # depends on micro_batch_size x data-parallel ranks: off here, on in its own test
        "moe.aux_loss_coef=0",
    ]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from distrain.checkpoint.export import load_full_model

    return load_full_model(run_dir / "checkpoints" / f"step_{STEPS:08d}").state_dict()


def assert_same_run(reference_dir: Path, run_dir: Path) -> None:
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a["step"], a["grad_norm"], b["grad_norm"])
    # the eval set (3 micro-batches of 2) is split unevenly over 4 ranks and padded: same loss
    assert abs(expected[-1]["eval_loss"] - got[-1]["eval_loss"]) <= 1e-5, (expected[-1]["eval_loss"], got[-1]["eval_loss"])
    reference, params = final_params(reference_dir), final_params(run_dir)
    assert reference.keys() == params.keys()
    for name in reference:
        torch.testing.assert_close(params[name], reference[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("architecture, layouts", CASES, ids=[c[0] for c in CASES])
def test_layouts_match_single_process(tmp_path, ranks, saved_models, data_cache, architecture, layouts):
    architecture = architecture.split()[0]
    reference_dir = tmp_path / "reference"
    ranks.train(common_args(saved_models[architecture], data_cache, reference_dir))
    for name in layouts:
        run_dir = tmp_path / name.replace(" ", "").replace("=", "")
        ranks.train([*common_args(saved_models[architecture], data_cache, run_dir), *LAYOUTS[name]])
        assert_same_run(reference_dir, run_dir)


@pytest.mark.slow
def test_aux_loss_layouts_match_single_process(tmp_path, ranks, saved_models, data_cache):
    """The load-balancing loss over the same balance groups (micro_batch_size x data-parallel
    ranks = 8 sequences) under EP, under expert-TP with SP (the router's gradient not summed over
    TP twice) and under TP x EP (each TP rank routing its slice): equal to one process."""
    aux = ["moe.aux_loss_coef=0.05"]  # eval: the same 8 held-out sequences in every run
    reference = tmp_path / "reference"
    ranks.train([*common_args(saved_models["qwen3_moe"], data_cache, reference), *aux, "train.micro_batch_size=8", "eval.batches=1"])
    records = read_metrics(reference)
    assert all(r["moe_aux_loss"] > 0 for r in records) and len(records[0]["moe_tokens_per_expert"]) == 2
    for name, micro in (("ep=4", 2), ("dp_shard=2 x tp=2 sp", 4), ("tp=2 x ep=2", 8)):
        run_dir = tmp_path / name.replace(" ", "").replace("=", "")
        ranks.train([*common_args(saved_models["qwen3_moe"], data_cache, run_dir), *aux, f"train.micro_batch_size={micro}", f"eval.batches={8 // micro}", *LAYOUTS[name]])
        assert_same_run(reference, run_dir)
        for a, b in zip(records, read_metrics(run_dir)):
            assert a["moe_tokens_per_expert"] == b["moe_tokens_per_expert"], (name, a["step"])
            assert abs(a["moe_aux_loss"] - b["moe_aux_loss"]) <= 1e-6 * a["moe_aux_loss"] + 1e-9, (name, a["step"])


@pytest.mark.slow
def test_capacity_layouts_match_single_process(tmp_path, ranks, saved_models, data_cache):
    """moe.capacity_factor drops the same (token, expert) pairs under EP (each rank drops over its
    own micro-batch, as one process does per micro-batch) and expert-TP (every TP rank routes the
    same tokens): equal to one process, with the same dropped fractions."""
    # (4 eval micro-batches: one per rank, as in one process; padding one would change who is dropped)
    capacity = ["moe.capacity_factor=1.0", "eval.batches=4"]
    reference = tmp_path / "reference"
    ranks.train([*common_args(saved_models["qwen3_moe"], data_cache, reference), *capacity])
    records = read_metrics(reference)
    assert all(0 < max(r["moe_dropped_fraction"]) < 0.75 for r in records), [r["moe_dropped_fraction"] for r in records]
    for name in ("ep=4", "dp_shard=2 x tp=2 sp"):
        run_dir = tmp_path / name.replace(" ", "").replace("=", "")
        ranks.train([*common_args(saved_models["qwen3_moe"], data_cache, run_dir), *capacity, *LAYOUTS[name]])
        assert_same_run(reference, run_dir)
        for a, b in zip(records, read_metrics(run_dir)):
            assert a["moe_dropped_fraction"] == b["moe_dropped_fraction"], (name, a["step"])


@pytest.mark.parametrize(
    "layout, key",
    [
        (["launcher.nproc_per_node=2", "parallel.dp_shard=3"], "parallel.dp_shard"),
        (["launcher.nproc_per_node=2", "parallel.tp=2", "++model.config.num_key_value_heads=1"], "parallel.tp"),
        (["launcher.nproc_per_node=4", "parallel.tp=4", "++model.config.num_attention_heads=6"], "parallel.tp"),
        (["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true", "train.seq_len=255"], "train.seq_len"),
        (["launcher.nproc_per_node=2", "parallel.ep=3"], "parallel.ep"),
        (["launcher.nproc_per_node=4", "parallel.ep=8", "train.micro_batch_size=2"], "parallel.ep"),
        (["launcher.nproc_per_node=2", "parallel.ep=2", "parallel.tp=2", "train.seq_len=255"], "parallel.ep"),
        (["launcher.nproc_per_node=2", "parallel.ep=2", "model=llama_debug"], "parallel.ep"),
        (["launcher.nproc_per_node=2", "parallel.tp=2", "++model.config.vocab_size=4097"], "vocab_size"),
        (["launcher.nproc_per_node=2", "parallel.tp=2", "++model.config.moe_intermediate_size=33"], "gate_up_proj"),
        (["launcher.nproc_per_node=2", "parallel.sp=true"], "parallel.sp"),
        (["launcher.nproc_per_node=4", "parallel.dp_shard=4", "train.micro_batch_size=4"], "train.global_batch_size"),
        (["launcher.nproc_per_node=2", "parallel.cpu_offload=true", "run.device=cpu"], "parallel.cpu_offload"),
    ],
)
def test_invalid_layouts_exit_2_before_any_worker(tmp_path, layout, key):
    proc = run_cli_here(["train", "recipe=qwen3_moe_debug", *layout], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert key in line and ("e.g." in line or "use parallel" in line), line
    assert "[rank" not in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()  # no worker started


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(tmp_path, tiny):
    start = time.perf_counter()
    proc = run_cli(
        ["train", "recipe=qwen3_moe_debug", *tiny, "launcher.nproc_per_node=2", "launcher.timeout_s=60", "train.steps=50",
         f"run.dir={tmp_path / 'run'}"],
        tmp_path,
        env={**MULTI, "DISTRAIN_FAULT": "raise@step:rank=1:step=3"},
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "injected fault" in proc.stderr + proc.stdout
    assert elapsed < 60, elapsed  # well inside the collective timeout: nobody waited for it
    # one traceback, the failing rank's (its peer, failing on the broken collective, says so in a line
    # unless the launcher stops it first); the launcher names rank 1
    assert proc.stderr.count("Traceback") == 1 and "on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert "distrain: rank 1 failed with exit code 1" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "architecture, extra, style",
    [
        ("bloom", [], "declares no TP plan"),  # fused query_key_value, no plan
        ("stablelm", ["++model.config.qk_layernorm=true"], "q_layernorm"),  # per-head norms indexed by global head
    ],
)
def test_tp_on_unmapped_plans_exits_2(tmp_path, saved_models, architecture, extra, style):
    proc = run_cli_here(["train", "recipe=qwen3_moe_debug", "model=pretrained", f"model.name_or_path={saved_models[architecture]}",
                    "launcher.nproc_per_node=2", "parallel.tp=2", "data.vocab_size=1024", "model.attn_implementation=eager", *extra], tmp_path)
    assert proc.returncode == 2 and style in proc.stderr and "parallel.tp=1" in proc.stderr, proc.stderr


def test_a_model_that_attends_across_documents_is_refused(tmp_path, ranks, saved_models, data_cache):
    """Bloom's alibi attention ignores position ids, so packing's document isolation does not hold:
    refused before spawn with one line naming data.document_masking; with it off, it trains."""
    args = [*common_args(saved_models["bloom"], data_cache, tmp_path / "run"), "model.attn_implementation=eager", "train.steps=2"]
    proc = run_cli_here(["train", *args], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Bloom" in proc.stderr and "data.document_masking=false" in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    ranks.train([*args, "data.document_masking=false"])
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def _plan_bytes(stdout: str) -> dict[str, int]:
    found = re.findall(r"^\s+(parameters|gradients|optimizer|total)\s+([\d,]+) B", stdout, flags=re.M)
    return {key: int(value.replace(",", "")) for key, value in found}


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture, layout",
    [("llama", "dp_shard=4"), ("llama", "tp=2 sp"), ("llama", "dp_shard=2 x tp=2 sp"), ("qwen3_moe", "dp_shard=4 x ep=2")],
)
def test_plan_reports_the_bytes_the_shards_hold(tmp_path, ranks, saved_models, data_cache, architecture, layout):
    args = [*common_args(saved_models[architecture], data_cache, tmp_path / "run"), *LAYOUTS[layout], "train.steps=1"]
    plan = check_ok(run_cli_here(["plan", *args], tmp_path)).stdout
    if "ep=" in layout:  # 4 experts over 2 EP ranks, FSDP-sharded over the other 2 ranks of dp_shard
        assert "EP rank r holds experts 0: 0-1, 1: 2-3 of every MoE layer (2 of 4), FSDP-sharded over 2 rank(s)" in plan, plan
        assert re.search(r"experts\.gate_up_proj\s+\[4, 64, 64\] -> \[1, 64, 64\]\s+efsdp: _S\(0, 2\), ep: S\(0\)", plan), plan
    # activations per checkpointing mode: keeping everything takes the most
    estimates = {k: int(v.replace(",", "")) for k, v in re.findall(r"^\s+(none|selective|full)\s+[\d.]+ GiB \(([\d,]+) B\)", plan, flags=re.M)}
    assert len(estimates) == 3 and estimates["none"] > max(estimates["selective"], estimates["full"]) > 0, plan
    planned = _plan_bytes(plan)
    assert set(planned) == {"parameters", "gradients", "optimizer", "total"}
    ranks.train(args)
    (record,) = read_metrics(tmp_path / "run")
    held = {"parameters": record["param_bytes"], "gradients": record["grad_bytes"], "optimizer": record["optimizer_bytes"]}
    assert held == {k: planned[k] for k in held}


@pytest.mark.parametrize("layout", ["dp_shard=2 x tp=2 sp", "tp=2 x ep=2 selective AC"])
def test_blocks_are_resharded_after_forward_under_tp(tmp_path, ranks, saved_models, data_cache, layout):
    """DeepSeek-V3 under TP, one FSDP unit per block: when the last block runs, no earlier block's
    weights are held whole (routers aside), including those TP leaves whole (the MLA attention;
    under TP x EP the shared expert too), which are sharded over dp x tp and resharded with their
    block."""
    overrides = [a for a in common_args(saved_models["deepseek_v3"], data_cache, tmp_path / "run") if not a.startswith("recipe=")]
    held = ranks.call(4 if "dp_shard=2" in layout else 2, "rank_jobs:unsharded_when_the_last_block_runs", "qwen3_moe_debug",
                      [*overrides, *LAYOUTS[layout], "parallel.fsdp_unit_mb=0"])
    assert held == [[]] * len(held), held


@pytest.mark.slow
@pytest.mark.parametrize("architecture, layout", [("phi", "tp=2 sp"), ("gemma", "tp=2")])
def test_tp_collectives_are_waited_where_they_are_issued(tmp_path, ranks, saved_models, data_cache, architecture, layout):
    """No TP collective goes through torch's DTensor styles, whose asynchronous functional
    collectives crashed a rank of phi tp=2 sp on gloo in native code at random steps (CI, stop 20):
    phi's rowwise projections with a bias and its lm_head with a bias, gemma's tied lm_head."""
    overrides = [*common_args(saved_models[architecture], data_cache, tmp_path / "run")[1:], *LAYOUTS[layout][1:]]
    assert ranks.call(2, "rank_jobs:asynchronous_collectives", "qwen3_moe_debug", overrides) == [0, 0]


@pytest.mark.parametrize(
    "recipe, world, layout, max_state_ratio",
    [
        ("qwen3_moe_debug", 2, ["parallel.dp_shard=2"], 1.0),
        ("qwen3_moe_debug", 2, ["parallel.tp=2", "parallel.sp=true"], 1.0),  # expert-TP
        ("qwen3_moe_debug", 2, ["parallel.ep=2"], 1.0),  # all-to-all bytes: exactly the rows routed to the other rank
        ("qwen3_moe_debug", 2, ["parallel.ep=2", "moe.dispatch_chunks=3"], 1.0),  # and the counts once, in pieces too
        ("qwen3_moe_debug", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"], 1.0),
        ("qwen3_moe_debug", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2", "parallel.fsdp_unit_mb=0"], 1.0),
        ("llama_debug", 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], 1.0),
        ("llama_debug", 4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.sp=true"], 1.0),
        ("llama_debug", 4, ["parallel.dp_shard=4", "parallel.fsdp_unit_mb=0"], 1.0),
        # selective checkpointing keeps the collectives' outputs: the recompute moves nothing again
        ("llama_debug", 2, ["parallel.tp=2", "parallel.sp=true", "parallel.activation_checkpointing=selective"], 1.0),
        ("qwen3_moe_debug", 2, ["parallel.tp=2", "parallel.activation_checkpointing=selective"], 1.0),
        # EP keeps the MoE blocks out of TP: each runs on its TP rank's slice of the sequence
        ("qwen3_moe_debug", 4, ["parallel.tp=2", "parallel.ep=2"], 1.0),
    ],
)
def test_counted_bytes_meet_the_layout_minimum(tmp_path, ranks, tiny_dense, recipe, world, layout, max_state_ratio):
    """Communication and state bytes are counted, not timed: exact on any machine."""
    from conftest import MOE_TINY

    tp = 2 if "parallel.tp=2" in layout else 1
    tiny = [*tiny_dense, *(MOE_TINY if "moe" in recipe else [])]
    overrides = [*tiny, f"run.dir={tmp_path / 'run'}", "train.micro_batch_size=2", f"train.global_batch_size={2 * world // tp}", *layout]
    row = ranks.call(world, "layouts:measure", recipe, overrides, 1)[0]
    assert 1.0 <= row["comm_ratio"] <= 1.05, row
    assert 1.0 <= row["state_ratio"] <= max_state_ratio, row
    if any(o.startswith("parallel.ep=") for o in layout):
        assert row["all_to_all_ratio"] == pytest.approx(1.0, rel=1e-12), row
    assert not row["uncounted_ops"], row


@pytest.mark.parametrize("sp", ["false", "true"])
def test_the_minimum_counts_no_tp_sum_for_attention_left_whole(tmp_path, ranks, sp):
    """A tiny DeepSeek-V3 under tp=2, without and with SP: its plan leaves the MLA attention whole,
    so attention sums nothing over TP; under SP its input is gathered in forward and its output's
    gradient in backward. Counted bytes meet that minimum (one counting a TP sum there put tp=2
    without SP at 0.75x)."""
    from test_moe import _saved_deepseek

    model = _saved_deepseek(tmp_path / "model", skew=0.0)
    overrides = ["model=pretrained", f"model.name_or_path={model}", "data.vocab_size=1024", f"run.dir={tmp_path / 'run'}",
                 "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2", "parallel.tp=2", f"parallel.sp={sp}"]
    row = ranks.call(2, "layouts:measure", "qwen3_moe_debug", overrides, 0)[0]
    assert 1.0 <= row["comm_ratio"] <= 1.05, row
    assert not row["uncounted_ops"], row


def test_profile_writes_a_trace_per_rank(tmp_path, ranks, tiny_dense):
    """profile.steps=[2,3] on dp_shard=2: each rank writes a Chrome trace holding steps 2 and 3
    (not 1), FSDP's all-gathers and reduce-scatters and the gloo collectives; the overlap summary
    reads it."""
    import json

    from distrain.metrics.profile import comm_overlap

    run_dir = tmp_path / "run"
    ranks.train([
        "recipe=llama_debug", *tiny_dense, "launcher.nproc_per_node=2", "parallel.dp_shard=2", "train.steps=3", "eval.interval=0",
        "checkpoint.export=false", "profile.steps=[2,3]", "profile.memory=true", f"run.dir={run_dir}",
    ])
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["trace_rank0.json", "trace_rank1.json"]
    for rank in range(2):
        trace = json.loads((run_dir / "profile" / f"trace_rank{rank}.json").read_text())
        names = [e.get("name", "") for e in trace["traceEvents"] if e.get("ph") == "X"]
        assert {"step 2", "step 3"} <= set(names) and "step 1" not in names
        assert any(n.startswith("FSDP::all_gather") for n in names) and any(n.startswith("FSDP::post_backward_reduce") for n in names)
        assert "gloo:all_gather" in names and any(e.get("name") == "[memory]" for e in trace["traceEvents"])
        comm, overlapped = comm_overlap(trace)
        assert comm > 0 and 0 <= overlapped <= comm


@pytest.mark.slow
def test_grad_sync_step_reduces_gradients_once_per_step(tmp_path, ranks, tiny_dense):
    """Two micro-batches per rank on HSDP x EP: with parallel.grad_sync=micro_batch FSDP reduce-
    scatters after each (and all-reduces over the replicas once), with =step once per step, as
    one micro-batch does; both at their minimum."""
    from conftest import MOE_TINY

    layout = ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.ep=2"]
    rows = {}
    for name, micro, sync in (("one", 2, "micro_batch"), ("micro_batch", 1, "micro_batch"), ("step", 1, "step")):
        overrides = [*tiny_dense, *MOE_TINY, f"run.dir={tmp_path / name}", f"train.micro_batch_size={micro}", "train.global_batch_size=8",
                     f"parallel.grad_sync={sync}", *layout]
        rows[name] = ranks.call(4, "layouts:measure", "qwen3_moe_debug", overrides, 0)[0]
        assert 1.0 <= rows[name]["comm_ratio"] <= 1.05, (name, rows[name])
    one, each, once = (rows[k]["comm_bus_bytes"] for k in ("one", "micro_batch", "step"))
    calls = {k: rows[k]["comm_calls"] for k in rows}
    assert calls["micro_batch"]["reduce_scatter"] == 2 * calls["one"]["reduce_scatter"], calls
    assert calls["step"]["reduce_scatter"] == calls["one"]["reduce_scatter"], calls
    assert each["reduce_scatter"] == pytest.approx(2 * one["reduce_scatter"], rel=1e-12)
    assert once["reduce_scatter"] == pytest.approx(one["reduce_scatter"], rel=1e-12)
    # the replicas' all-reduce of the gradient shards: once per step in both modes
    grad_all_reduce = {k: rows[k]["comm_calls"]["all_reduce"] for k in rows}
    assert grad_all_reduce["micro_batch"] == grad_all_reduce["step"], grad_all_reduce


@pytest.mark.slow
def test_selective_checkpointing_keeps_grouped_gemms_and_all_to_alls(tmp_path, ranks, tiny):
    """Under EP, selective activation checkpointing recomputes neither the grouped GEMMs nor the
    all-to-alls (counted: the same calls and bytes as without checkpointing); full
    checkpointing, the control, repeats both."""
    counted = {}
    for mode in ("none", "selective", "full"):
        overrides = [*tiny, f"run.dir={tmp_path / mode}", "train.micro_batch_size=2", "train.global_batch_size=4", "parallel.ep=2",
                     f"parallel.activation_checkpointing={mode}"]
        counted[mode] = ranks.call(2, "rank_jobs:count_step", "qwen3_moe_debug", overrides)[0]
    none, selective, full = counted["none"], counted["selective"], counted["full"]
    assert none["grouped_mm"] > 0 and none["collectives"]["all_to_all"] > 0, none
    assert selective == none, counted
    assert full["grouped_mm"] > none["grouped_mm"] and full["bus"]["all_to_all"] > none["bus"]["all_to_all"], counted


@pytest.mark.slow
def test_work_runs_while_the_rows_travel(tmp_path, ranks, saved_models, data_cache):
    """Under EP, DeepSeek-V3's shared expert (called by the model after its experts) runs while
    the dispatch all-to-all is in flight: its 3 projections in forward, their 6 gradient matmuls
    in backward, with and without selective checkpointing; the return all-to-all has nothing
    beside it. Qwen2-MoE calls its shared expert first: nothing is left to run beside either.
    With moe.dispatch_chunks=2 each piece's expert GEMMs run beside the other piece's exchanges."""
    layers = 2
    for architecture, extra, expected in [
        ("deepseek_v3", [], ([3, 0] * layers, [0, 6] * layers)),
        ("deepseek_v3", ["parallel.activation_checkpointing=selective", "parallel.fsdp_unit_mb=0"], ([3, 0] * layers, [0, 6] * layers)),
        ("qwen2_moe", [], ([0, 0] * layers, [0, 0] * layers)),
        # in 2 pieces: piece 0's 2 grouped GEMMs (gate_up, down) run while piece 1 arrives, piece 1's while
        # piece 0 goes back; in backward their 4 gradient GEMMs the same way round
        ("qwen3_moe", ["moe.dispatch_chunks=2"], ([0, 2, 2, 0] * layers, [0, 4, 4, 0] * layers)),
    ]:
        overrides = [*common_args(saved_models[architecture], data_cache, tmp_path / architecture)[1:], "train.micro_batch_size=4", "parallel.ep=2", *extra]
        for rank, windows in enumerate(ranks.call(2, "rank_jobs:all_to_all_windows", "qwen3_moe_debug", overrides)):
            # the windows close in the order dispatch, return, per layer (backward: return, dispatch, from the last layer)
            assert (windows["forward"], windows["backward"]) == expected, (architecture, extra, rank, windows)


def resume_args(model_dir: Path, data_cache: Path, run_dir: Path) -> list[str]:
    return [*common_args(model_dir, data_cache, run_dir), "train.steps=8", "checkpoint.interval=3", "checkpoint.keep=0"]


def stop_at(step: int) -> dict[str, str]:
    """Every rank gets SIGTERM during `step`: the ranks agree, save that step and exit 143."""
    return {"DISTRAIN_FAULT": f"signal@step:step={step}:signal=SIGTERM"}


def assert_resumed_run(reference: Path, run_dir: Path) -> None:
    got = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(got) == list(range(1, 9))
    for a in read_metrics(reference):
        b = got[a["step"]]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a["step"], a["grad_norm"], b["grad_norm"])


@pytest.mark.slow
def test_checkpoints_resume_across_layouts(tmp_path, ranks, saved_models, data_cache):
    """A checkpoint written by one process resumes under expert-TP + SP (packed gate_up shards
    loaded from contiguous storage), and one written under expert-TP resumes in one process:
    every step matches the uninterrupted single-process run."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    ranks.train(resume_args(saved_models["qwen3_moe"], data_cache, reference))
    assert ranks.run(resume_args(saved_models["qwen3_moe"], data_cache, run_dir), env=stop_at(2)) == [143]
    tp_sp = ["launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true"]
    assert ranks.run([*resume_args(saved_models["qwen3_moe"], data_cache, run_dir), *tp_sp], env=stop_at(5)) == [143, 0]
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()
    ranks.train(resume_args(saved_models["qwen3_moe"], data_cache, run_dir))  # steps 6-8 in one process
    assert_resumed_run(reference, run_dir)


@pytest.mark.slow
def test_checkpoints_resume_across_ep_layouts(tmp_path, ranks, saved_models, data_cache):
    """ep=4 -> dp_shard=2 x ep=2 -> 1 process, each stopped after a checkpoint: the experts
    (DTensors sharded on the experts dimension, FSDP on top) are resharded by DCP and every
    step matches the uninterrupted single-process run."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    ranks.train(resume_args(saved_models["qwen3_moe"], data_cache, reference))
    for layout, stop in ((["launcher.nproc_per_node=4", "parallel.ep=4"], 3), (["launcher.nproc_per_node=2", "parallel.dp_shard=2", "parallel.ep=2"], 6)):
        statuses = ranks.run([*resume_args(saved_models["qwen3_moe"], data_cache, run_dir), *layout], env=stop_at(stop))
        assert statuses[0] == 143 and not any(statuses[1:]) and (run_dir / "checkpoints" / f"step_{stop:08d}").is_dir(), statuses
    ranks.train(resume_args(saved_models["qwen3_moe"], data_cache, run_dir))  # steps 7-8 in one process
    assert_resumed_run(reference, run_dir)


@pytest.fixture(scope="module")
def eager_reference(tmp_path_factory, ranks, tiny) -> Path:
    """One process, eager: the run every compiled layout is compared with."""
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    ranks.train([*COMPILE_COMMON, *tiny, f"run.dir={run_dir}"])
    return run_dir


# (the load-balancing loss is off: its balance groups are micro_batch_size x data-parallel ranks)
COMPILE_COMMON = ["recipe=qwen3_moe_debug", "train.steps=3", "eval.interval=0", "checkpoint.interval=0", "checkpoint.export=false", "moe.aux_loss_coef=0"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.tp=2", "parallel.sp=true"], ["parallel.ep=2"]], ids=["fsdp", "tp sp", "ep"])
def test_compiled_blocks_match_eager(tmp_path, ranks, tiny, eager_reference, layout):
    """parallel.compile=true (torch.compile per block, inductor on the CPU here) under FSDP, under
    TP + SP (the vocab-parallel embedding's gradient crosses into the compiled first block) and
    under EP (the dispatch runs eager inside the compiled blocks); torch logs no error on the way
    (a frame dynamo fails to trace runs eager, silently slower)."""
    ranks.train([*COMPILE_COMMON, *tiny, f"run.dir={tmp_path / 'compiled'}", "launcher.nproc_per_node=2", *layout, "parallel.compile=true"],
                timeout=600)
    for log in ranks.job_logs(2):
        assert not re.search(r"^(\[rank\d+\]:)?E\d{4} ", log, re.MULTILINE), log[-2000:]  # torch's error lines
    for a, b in zip(read_metrics(eager_reference), read_metrics(tmp_path / "compiled"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)


EXPORT_PROBE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
torch.save(logits, sys.argv[3])
"""


@pytest.mark.slow
def test_sharded_export_of_a_4_rank_checkpoint_loads_with_from_pretrained(tmp_path, ranks, saved_models, data_cache):
    """A Qwen3-MoE checkpoint written by dp_shard=4 x ep=2 (4 ranks) exports to several safetensors shards with
    an index in the hub key format (one 2-D weight per expert); plain `from_pretrained` in a fresh
    process reproduces distrain's logits (1e-5 in fp32; the bf16 export within bf16 rounding)."""
    import json
    import subprocess
    import sys

    from distrain.checkpoint.export import load_full_model

    run_dir = tmp_path / "run"
    ranks.train([*common_args(saved_models["qwen3_moe"], data_cache, run_dir), "train.steps=2", "launcher.nproc_per_node=4", "parallel.dp_shard=4",
                 "parallel.ep=2"])
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    model = load_full_model(checkpoint).eval()
    batch = {"input_ids": torch.randint(3, 1024, (2, 24)), "position_ids": torch.arange(24).repeat(2, 1)}
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
    torch.save(batch, tmp_path / "batch.pt")
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 3e-2)):
        out = tmp_path / f"export-{dtype}"
        check_ok(run_cli(["export", str(checkpoint), str(out), "--dtype", dtype, "--max-shard-size", "100KB"], tmp_path))
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 3 and all(not (out / s).stat().st_size > 100_000 + (1 << 20) + 200_000 for s in shards)
        keys = set(index["weight_map"])
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys and not any("gate_up_proj" in k for k in keys), sorted(keys)[:8]
        assert (out / "config.json").is_file() and (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
        subprocess.run([sys.executable, "-c", EXPORT_PROBE, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")], check=True,
                       capture_output=True, timeout=300)
        got = torch.load(tmp_path / "logits.pt")
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < tolerance, (dtype, error)


RSS_PROBE = r"""
import sys, torch
from pathlib import Path
from transformers import AutoTokenizer
from distrain.checkpoint.export import export_checkpoint
from distrain.config.load import read_config_yaml
from distrain.models import build_config, meta_model

def status_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

# what an export imports (transformers' modeling and tokenizer code: about 200 MB, whatever the
# model's size) is loaded before the baseline, by building the model on the meta device and
# reading the tokenizer
checkpoint = Path(sys.argv[1])
meta_model(build_config(read_config_yaml(checkpoint / "config.yaml").model))
AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status_kib("VmRSS")
export_checkpoint(checkpoint, sys.argv[2], dtype=torch.float32, max_shard_size="32MB")
print(before, status_kib("VmHWM"), flush=True)
"""


@pytest.mark.slow
def test_export_memory_stays_below_the_model(tmp_path, ranks, data_cache):
    """Exporting a 220 MB model (fp32) raises the exporting process's peak memory (its own
    counters: VmRSS before, VmHWM after; the code an export imports loaded before)
    by less than half the model: tensors are read, converted and written module by module, shards
    straight to disk."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    ranks.train(["recipe=llama_debug", "++model.config.hidden_size=512", "++model.config.intermediate_size=1536", "++model.config.num_hidden_layers=16",
                 "++model.config.num_attention_heads=8", "++model.config.num_key_value_heads=4", "data.vocab_size=1024", "data.max_bytes=600000",
                 f"data.cache_dir={data_cache}", "train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=2", "train.steps=1",
                 "eval.interval=0", "checkpoint.export=false", f"run.dir={run_dir}"])
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(checkpoint), str(tmp_path / "export")], capture_output=True, text=True, check=True, timeout=300)
    before_kib, peak_kib = map(int, out.stdout.split()[-2:])
    from safetensors import safe_open

    import math

    model_bytes = 0
    for shard in (tmp_path / "export").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            model_bytes += sum(4 * math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    assert model_bytes > 200e6, model_bytes
    assert (peak_kib - before_kib) * 1024 < 0.5 * model_bytes, (before_kib, peak_kib, model_bytes)


def first_batch_loss(model_dir: Path, data_cache: Path, seq_len: int = 32, global_batch: int = 8) -> float:
    """The loss of the first global batch of `common_args`' runs under plain `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    from distrain.config.schema import DataConfig
    from distrain.data.corpus import load_corpus
    from distrain.data.loader import GlobalBatchLoader
    from distrain.data.packing import PackedDataset

    corpus = load_corpus(DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=str(data_cache)))
    loader = GlobalBatchLoader(PackedDataset(corpus.train, seq_len), global_batch, global_batch, 0, 1, seed=0)
    batch = loader.next_batch()[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


@pytest.mark.slow
def test_sharded_import_matches_from_pretrained(tmp_path, ranks, saved_models, data_cache):
    """A Qwen3-MoE of 12 experts saved by `save_pretrained` in several shards (hub keys: one 2-D
    weight per expert, listed expert 10 before expert 2) is read into a plain model exactly as
    `from_pretrained` reads it; shard by shard into one process, dp_shard=2 x tp=2 and dp_shard=4 x
    ep=2, each run's first loss equals plain `from_pretrained`'s on the same batch within 1e-5, and
    under dp_shard=4 x ep=2 each rank reads its 3 experts only."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "sharded"
    config = AutoConfig.from_pretrained(saved_models["qwen3_moe"])
    config.num_experts = 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="100KB")
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(keys.values())) > 3 and "model.layers.0.mlp.experts.11.up_proj.weight" in keys
    from distrain.checkpoint.hf_import import load_sharded, map_keys

    reference, model = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_config(config)
    load_sharded(model, map_keys(model, folder))  # in this process, unsharded: every tensor exactly
    for (name, want), got in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, got), name
    expected = first_batch_loss(folder, data_cache)
    for name, layout in {"1 process": [], "dp_shard=2 x tp=2": LAYOUTS["dp_shard=2 x tp=2"], "dp_shard=4 x ep=2": LAYOUTS["dp_shard=4 x ep=2"]}.items():
        run_dir = tmp_path / name.replace(" ", "_").replace("=", "")
        ranks.train([*common_args(folder, data_cache, run_dir), "train.steps=1", *layout])
        loss = read_metrics(run_dir)[0]["loss"]
        assert abs(loss - expected) < 1e-5, (name, loss, expected)
    overrides = [a for a in common_args(folder, data_cache, tmp_path / "reads") if not a.startswith("recipe=")]
    read = ranks.call(4, "rank_jobs:expert_reads", "qwen3_moe_debug", [*overrides, *LAYOUTS["dp_shard=4 x ep=2"]])
    assert all(len(experts) == 3 for experts in read) and sorted(sum(read, [])) == list(range(12)), read


@pytest.mark.slow
def test_import_memory_per_rank_stays_below_half_the_model(tmp_path, ranks, data_cache):
    """A 220 MB Llama (fp32, 5 safetensors shards) imported into dp_shard=4: no rank's resident
    memory rises by half the model (each reads its shards' boxes; before, rank 0 loaded it whole)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
                                  num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path / "llama", max_shard_size="50MB")
    del model
    overrides = ["model=pretrained", f"model.name_or_path={tmp_path / 'llama'}", "data.vocab_size=1024", "data.max_bytes=600000",
                 f"data.cache_dir={data_cache}", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=1",
                 f"run.dir={tmp_path / 'run'}", "launcher.nproc_per_node=4", "parallel.dp_shard=4"]
    ranks.call(4, "rank_jobs:import_memory", "llama_debug", overrides)  # the first job in fresh ranks also imports torch's FSDP, DTensor...
    rows = ranks.call(4, "rank_jobs:import_memory", "llama_debug", overrides)
    assert model_bytes > 200e6
    for rank, row in enumerate(rows):
        assert abs(row["shard_bytes"] - model_bytes / 4) < 0.01 * model_bytes, (rank, row)
        assert row["grown"] < 0.5 * model_bytes, (rank, row, model_bytes)


def test_pretrained_weights_missing_tensors_exit_2_before_any_worker(tmp_path, saved_models, data_cache):
    """A config asking for more layers than the safetensors hold is refused before spawn, naming the
    first tensors without weights."""
    proc = run_cli_here(["train", *common_args(saved_models["qwen3_moe"], data_cache, tmp_path / "run"), "++model.config.num_hidden_layers=3"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no weights for" in proc.stderr and "model.layers.2." in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_rank_that_crashes_is_answered_for_with_its_python_stack(ranks, tmp_path):
    """The test ranks' own promise (tests/ranks.py): a job whose rank's process dies in native code
    runs once more, with a warning naming how it died and the Python stack it died in; dying again
    fails it; the jobs after it run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ranks.call(2, "rank_jobs:abort_on", 1, str(tmp_path / "aborted")) == [None, None]  # the second try
        with pytest.raises(AssertionError) as failed:
            ranks.call(2, "rank_jobs:abort_on", 1)
    text = str(failed.value)
    assert "raised on ranks [1]" in text and "killed by SIGABRT" in text and "in abort_on" in text, text[-3000:]
    said = [str(w.message) for w in caught if "running it once more" in str(w.message)]
    assert len(said) == 2 and all("rank 1 killed by SIGABRT" in m and "in abort_on" in m for m in said), said
    assert ranks.call(2, "rank_jobs:abort_on", 5) == [None, None]


def test_tp_checks_the_head_counts_only_where_the_plan_splits_heads():
    """Head counts must divide by tp where TP shards attention (a plan naming attention projections
    colwise, or no plan: the structural one), not where the plan leaves attention whole on every
    rank (DeepSeek-V3's MLA)."""
    from transformers import AutoConfig

    from distrain.config.schema import ConfigError, ParallelConfig
    from distrain.parallel.mesh import _check_model_fits

    cfg = ParallelConfig(tp=2)
    whole = AutoConfig.for_model("deepseek_v3", hidden_size=96, num_attention_heads=3, num_key_value_heads=3)
    _check_model_fits(cfg, whole, 64)  # attention whole: 3 heads are fine
    for split in (AutoConfig.for_model("llama", hidden_size=96, num_attention_heads=3, num_key_value_heads=3),
                  AutoConfig.for_model("llama", hidden_size=96, num_attention_heads=3, num_key_value_heads=3, base_model_tp_plan={})):
        with pytest.raises(ConfigError, match="does not divide the model's 3 attention heads"):
            _check_model_fits(cfg, split, 64)
