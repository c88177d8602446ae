"""The CLI as a user runs it: recipes, user recipes, overrides, and configuration errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import check_ok, read_metrics, run_cli, run_cli_here

REQUIRED_KEYS = {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"}


def resolved(proc) -> dict:
    return yaml.safe_load(check_ok(proc).stdout)


def test_shipped_recipe_trains_checkpoints_and_exports(tmp_path, tiny):
    run_dir = tmp_path / "run"
    proc = check_ok(run_cli(["train", "recipe=qwen3_moe_debug", *tiny, "train.steps=4", "eval.interval=2", "checkpoint.interval=2", f"run.dir={run_dir}"], tmp_path))
    assert "step 4/4" in proc.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["architecture"] == "qwen3_moe" and config["train"]["steps"] == 4
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(REQUIRED_KEYS <= r.keys() for r in records)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert "eval_loss" in records[1] and "eval_loss" in records[3]
    # keep=2: the checkpoints at steps 2 and 4, both complete, nothing temporary left
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    # the export loads with transformers and reproduces the trainer's final eval loss
    from transformers import AutoModelForCausalLM

    from distrain.config import read_config_yaml
    from distrain.data.corpus import load_corpus
    from distrain.data.loader import eval_batches
    from distrain.data.packing import PackedDataset

    job = read_config_yaml(run_dir / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    eval_set = PackedDataset(load_corpus(job.data).eval, job.train.seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(eval_set, job.eval.batches * job.train.micro_batch_size, job.train.micro_batch_size, 0, 1):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
            count += (batch["labels"] != -100).sum().item()
    assert abs(total / count - records[-1]["eval_loss"]) < 1e-4
    # the trained special tokens are the tokenizer's; generate() uses its cache; files readable by all
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export")
    config, generation = (json.loads((run_dir / "export" / name).read_text()) for name in ("config.json", "generation_config.json"))
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["bos_token_id"] == tokenizer.bos_token_id and config["use_cache"] and generation.get("use_cache", True)
    assert all((path.stat().st_mode & 0o777) == 0o644 for path in (run_dir / "export").iterdir()), [
        (path.name, oct(path.stat().st_mode)) for path in (run_dir / "export").iterdir()]


def test_user_recipe_inherits_and_overrides(tmp_path, tiny_dense):
    user = tmp_path / "my_recipe.yaml"
    user.write_text("defaults:\n  - llama_debug\n  - _self_\nrun:\n  name: mine\ntrain:\n  steps: 3\noptim:\n  lr: 1.0e-3\n")
    config = resolved(run_cli(["train", f"recipe={user}", "--cfg", "job"], tmp_path))
    assert config["model"]["architecture"] == "llama"  # from the shipped recipe
    assert config["train"]["steps"] == 3 and config["optim"]["lr"] == 1e-3 and config["run"]["name"] == "mine"
    assert config["train"]["seq_len"] == 256  # untouched keys come through
    assert not (tmp_path / "runs").exists()  # --cfg job runs nothing

    run_dir = tmp_path / "run"
    check_ok(run_cli(["train", f"recipe={user}", *tiny_dense, f"run.dir={run_dir}", "checkpoint.export=false"], tmp_path))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3


def test_dotted_overrides_and_group_override(tmp_path):
    config = resolved(run_cli(["train", "recipe=qwen3_moe_debug", "optim.lr=0.01", "train.steps=7", "model=llama_debug", "logging.wandb.mode=offline", "--cfg", "job"], tmp_path))
    assert config["optim"]["lr"] == 0.01 and config["train"]["steps"] == 7
    assert config["model"]["architecture"] == "llama" and config["logging"]["wandb"]["mode"] == "offline"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),  # unknown key
        ("train.steps=abc", "train.steps"),  # wrong type
        ("train.steps=-1", "train.steps"),  # impossible value
        ("optim.schedule=linear", "optim.schedule"),  # not one of the choices
        ("train.global_batch_size=6", "train.global_batch_size"),  # not a multiple of the micro-batch
        ("moe.dispatch_chunks=0", "moe.dispatch_chunks"),  # no piece to send
        ("model.config.hiddn_size=3", "model.config.hiddn_size"),  # unknown model config key
        ("++model.config.hiddn_size=3", "model.config.hiddn_size"),
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path, override, key):
    proc = run_cli_here(["train", "recipe=qwen3_moe_debug", override], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_unknown_recipe_exits_2(tmp_path):
    proc = run_cli(["train", "recipe=no_such_recipe"], tmp_path)
    assert proc.returncode == 2 and "qwen3_moe_debug" in proc.stderr


def test_plan_prints_per_rank_memory(tmp_path):
    proc = check_ok(run_cli_here(["plan", "recipe=qwen3_moe_debug"], tmp_path))
    from distrain.config import load_job
    from distrain.models import build_config, build_meta_model

    job = load_job("qwen3_moe_debug", [])
    model, _ = build_meta_model(job.model, build_config(job.model))
    num_params = sum(p.numel() for p in model.parameters())
    assert f"{num_params:,} parameters" in proc.stdout
    assert f"{16 * num_params / 2**20:10.2f} MiB" in proc.stdout  # fp32 weights + grads + 2 Adam states


def test_plan_shows_roles_and_the_tp_styles_applied(tmp_path):
    proc = check_ok(run_cli_here(["plan", "recipe=qwen3_moe_debug", "launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true"], tmp_path))
    assert "final norm model.norm; block roles: self_attn=attention, mlp=moe, input_layernorm=norm" in proc.stdout
    assert "mlp.experts=moe_tp_experts, mlp.experts.gate_up_proj=packed_colwise" in proc.stdout
    # each rank holds a slice of the gate rows and one of the up rows of every expert
    assert re.search(r"mlp\.experts\.gate_up_proj\s+\[8, 512, 256\] -> \[8, 256, 256\]\s+dp_shard: S\(0\), tp: _S\(1, 2\)", proc.stdout)


def test_a_run_says_what_it_is_once_and_logs_it(tmp_path, tiny):
    """Before step 1, one block (model, layout, memory, data, outputs) from rank 0 alone; the console
    lines are in run.dir/train.log too; no third-party line is printed once per rank."""
    run_dir = tmp_path / "run"
    proc = check_ok(run_cli(["train", "recipe=qwen3_moe_debug", *tiny, "train.steps=2", "eval.interval=0", "checkpoint.export=false",
                             "launcher.nproc_per_node=2", "parallel.tp=2", "parallel.sp=true", f"run.dir={run_dir}"], tmp_path))
    lines = proc.stdout.splitlines()
    for head in ("model   qwen3_moe, 2 layers:", "layout  2 rank(s), cpu: tp=2 (tensor parallel, sequence parallel)", "memory  rank 0:",
                 "data    stdlib:", "outputs checkpoints"):
        assert sum(line.startswith(head) for line in lines) == 1, (head, proc.stdout)
    assert lines.index(next(l for l in lines if l.startswith("model "))) < lines.index(next(l for l in lines if l.startswith("step 1/2")))
    logged = (run_dir / "train.log").read_text().splitlines()
    assert [l for l in lines if l.startswith(("run ", "model ", "layout ", "step "))] == [l for l in logged if l.startswith(("run ", "model ", "layout ", "step "))]
    # (torch's mesh-slicing UserWarning, which every rank of a TP mesh hits, is one of them)
    ours = [line for line in proc.stderr.splitlines() if line.strip() and "torch/distributed/run.py" not in line]
    assert len(ours) == len(set(ours)), proc.stderr[-3000:]


def test_a_launcher_that_runs_fewer_ranks_than_the_recipe_is_named(tmp_path, tiny):
    """Under torchrun or srun the launcher's layout is the one used: a recipe asking for more ranks
    per node than it runs gets one warning line (from rank 0), and the run goes on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = check_ok(run_cli(["train", "recipe=qwen3_moe_debug", *tiny, "train.steps=1", "eval.interval=0", "checkpoint.export=false",
                             "launcher.nproc_per_node=2", f"run.dir={tmp_path / 'run'}"], tmp_path, env=launcher))
    warned = [line for line in proc.stderr.splitlines() if "launcher.nproc_per_node=2" in line]
    assert len(warned) == 1 and "runs 1 rank(s) on this node" in warned[0], proc.stderr[-2000:]


def test_plot_writes_pngs_of_several_runs(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    for name, scale in (("a", 1.0), ("b", 1.5)):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": s, "loss": scale * 6 / s, "lr": 1e-3 * min(1, s / 5), "grad_norm": 1 + 1 / s, "tokens_per_s": 1000.0 + s,
                    "mfu": 0.01, "moe_max_mean_load": [1 + 0.1 * s, 1.5]} for s in range(1, 21)]
        records[6] = {**records[6], "loss": None, "grad_norm": None, "skipped": True}  # a non-finite step: a gap
        records[9]["eval_loss"] = scale * 0.7
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = check_ok(run_cli(["plot", str(tmp_path / "a"), str(tmp_path / "b")], tmp_path))
    written = [Path(line) for line in proc.stdout.split()]
    assert [p.name for p in written] == ["curves.png", "router_load_a.png", "router_load_b.png"]
    for path in written:
        path = path if path.is_absolute() else tmp_path / path
        with Image.open(path) as image:
            pixels = image.convert("L")
            assert image.size[0] >= 800 and image.size[1] >= 300
            levels = np.asarray(pixels)
            assert levels.max() - levels.min() > 100 and len(np.unique(levels)) > 20  # drawn on, not blank
    missing = run_cli(["plot", str(tmp_path / "nowhere")], tmp_path)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr.strip().splitlines()[-1]
