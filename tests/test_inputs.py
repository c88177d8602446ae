"""Bad input of every kind: one line naming the key or path and the fix, exit 2, before any
worker starts (no run directory is made), never a traceback."""

from __future__ import annotations

import json
import re

import pytest

from conftest import check_ok, run_cli, run_cli_here

DATA = ["data.max_bytes=600000", "data.vocab_size=1024", "train.steps=1"]


def _files(root):
    """The bad files the cases point at."""
    (root / "broken.yaml").write_text("defaults:\n  - qwen3_moe_debug\n  - _self_\ntrain:\n  steps: [3\n")
    (root / "empty.jsonl").write_text("")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    (root / "badcfg").mkdir()
    (root / "badcfg" / "config.json").write_text('{"model_type": "llama", \n')
    (root / "unknown").mkdir()
    (root / "unknown" / "config.json").write_text('{"model_type": "gpt9000"}')


CASES = {  # name: (arguments, what the one line must say, extra environment)
    "recipe not YAML": (["recipe={root}/broken.yaml"], "broken.yaml:6: not valid YAML", {}),
    "model folder missing": (["model=pretrained", "model.name_or_path={root}/no/such/model"], "no such folder, and not a hub id", {}),
    "hub id offline": (["model=pretrained", "model.name_or_path=someone/not-cached"], "the hub is offline (HF_HUB_OFFLINE is set)",
                       {"HF_HUB_OFFLINE": "1"}),
    "config.json broken": (["model=pretrained", "model.name_or_path={root}/badcfg"], "config.json is not valid JSON", {}),
    "model_type unknown": (["model=pretrained", "model.name_or_path={root}/unknown"], "model_type='gpt9000' is not one transformers knows", {}),
    "architecture unknown": (["model.architecture=gpt9"], "e.g. gptj, gpt2", {}),
    "impossible size": (["++model.config.hidden_size=-3"], "model.config.hidden_size=-3: a size or count must be > 0", {}),
    "data file empty": (["data=local_jsonl", "data.files=[{root}/empty.jsonl]", "data.tokenizer={root}/badcfg"], "empty.jsonl is empty", {}),
    "data file missing": (["data=local_jsonl", "data.files=[{root}/nope.jsonl]", "data.tokenizer={root}/badcfg"], "nope.jsonl matches no file", {}),
    "tokenizer missing": (["data=local_jsonl", "data.files=[{root}/docs.jsonl]", "data.tokenizer={root}/no/tokenizer"],
                          "data.tokenizer={root}/no/tokenizer: no such folder", {}),
    "cuda without a GPU": (["run.device=cuda"], "run.device=cuda: no CUDA device is visible", {}),
    "nccl on the CPU": (["launcher.backend=nccl"], "launcher.backend=nccl needs CUDA GPUs", {}),
    "lr not finite": (["optim.lr=inf"], "optim.lr=inf: must be a finite number", {}),
    "sequence past the positions": (["train.seq_len=5000"], "train.seq_len=5000 is longer than the model's max_position_embeddings=4096", {}),
    "run.dir empty": (["run.dir="], "run.dir is empty", {}),
    "run.dir a file": (["run.dir={root}/empty.jsonl"], "is a file, not a folder", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    _files(tmp_path)
    args, expected, env = CASES[case]
    args = [a.format(root=tmp_path) for a in args]
    recipe = [] if any(a.startswith("recipe=") for a in args) else ["recipe=qwen3_moe_debug"]
    run_dir = [] if any(a.startswith("run.dir=") for a in args) else [f"run.dir={tmp_path / 'run'}"]
    command = ["train", *recipe, *args, *DATA, f"data.cache_dir={tmp_path / 'cache'}", *run_dir]
    # (huggingface_hub reads HF_HUB_OFFLINE when imported: that case needs a process of its own)
    proc = run_cli(command, tmp_path, env=env) if env else run_cli_here(command, tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distrain: config error: ") and expected.format(root=tmp_path) in last, last
    assert not (tmp_path / "run").exists()  # nothing started


def test_warmup_longer_than_the_run_is_one_warning_not_a_refusal(tmp_path):
    proc = check_ok(run_cli_here(["plan", "recipe=qwen3_moe_debug", "optim.warmup_steps=50", "train.steps=10"], tmp_path))
    warnings = [line for line in proc.stderr.splitlines() if "optim.warmup_steps=50" in line]
    assert warnings == ["warning: optim.warmup_steps=50 is more than train.steps=10: the learning rate never reaches optim.lr in this run"]


def test_an_eval_smaller_than_the_data_parallel_ranks_is_one_warning(tmp_path):
    args = ["plan", "recipe=qwen3_moe_debug", "launcher.nproc_per_node=4", "train.global_batch_size=4", "train.micro_batch_size=1", "eval.batches=2"]
    proc = check_ok(run_cli_here(args, tmp_path))
    warnings = [line for line in proc.stderr.splitlines() if "eval.batches" in line]
    assert warnings == ["warning: eval.batches x train.micro_batch_size = 2 held-out sample(s) for 4 data-parallel ranks: 2 rank(s) "
                        "evaluate nothing; eval.batches=4 or more gives each one sample"], proc.stderr


def test_an_indivisible_batch_names_values_that_work(tmp_path):
    args = ["plan", "recipe=qwen3_moe_debug", "launcher.nproc_per_node=3", "train.global_batch_size=8", "train.micro_batch_size=4"]
    proc = run_cli_here(args, tmp_path)
    assert proc.returncode == 2
    fixes = re.findall(r"(train\.\w+=\d+)", proc.stderr.strip().splitlines()[-1].split("; e.g.")[-1])
    assert fixes == ["train.global_batch_size=12"], proc.stderr  # no micro-batch size divides 8 over 3 ranks
    for fix in fixes:
        check_ok(run_cli_here([*args, fix], tmp_path))
    proc = run_cli_here(["plan", "recipe=qwen3_moe_debug", "launcher.nproc_per_node=2", "train.global_batch_size=12", "train.micro_batch_size=4"], tmp_path)
    fixes = re.findall(r"(train\.\w+=\d+)", proc.stderr.strip().splitlines()[-1].split("; e.g.")[-1])
    assert fixes == ["train.global_batch_size=16", "train.micro_batch_size=3"], proc.stderr
    for fix in fixes:
        check_ok(run_cli_here(["plan", "recipe=qwen3_moe_debug", "launcher.nproc_per_node=2", "train.global_batch_size=12", "train.micro_batch_size=4", fix],
                         tmp_path))


def test_resuming_another_model_is_refused_and_touches_nothing(tmp_path, tiny):
    run_dir = tmp_path / "run"
    check_ok(run_cli(["train", "recipe=qwen3_moe_debug", *tiny, "train.steps=1", "eval.interval=0", "checkpoint.export=false", f"run.dir={run_dir}"],
                     tmp_path))
    config = (run_dir / "config.yaml").read_text()
    checkpoint = sorted((run_dir / "checkpoints").iterdir())
    proc = run_cli_here(["train", "recipe=qwen3_moe_debug", *tiny, "++model.config.num_hidden_layers=3", "train.steps=2", f"run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "holds another model" in last and "model.config.num_hidden_layers: 2 -> 3" in last and "start fresh in another run.dir" in last, last
    assert (run_dir / "config.yaml").read_text() == config and sorted((run_dir / "checkpoints").iterdir()) == checkpoint


@pytest.mark.parametrize("architecture, expected", [("llama", "sdpa"), ("qwen3_moe", "sdpa"), ("gpt_oss", "eager"), ("bloom", "eager")])
def test_attention_auto_picks_what_the_model_supports(architecture, expected):
    """model.attn_implementation=auto (the default): sdpa where the model's code supports it (GPT-OSS
    and Bloom do not, and refused sdpa before), else eager; the model then builds."""
    from distrain.config.schema import ModelConfig
    from distrain.models import build_config, meta_model

    hf_config = build_config(ModelConfig(architecture=architecture))
    assert hf_config._attn_implementation == expected
    meta_model(hf_config)
