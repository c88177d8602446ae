"""The training loop: loss falls, accumulation is exact, resume is exact, wandb. Each run is a
job of `distrain train` in the test ranks (composed and validated as the CLI does, then distrain's
rank entry; tests/ranks.py): the CLI's own part is tests/test_cli.py."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from conftest import read_metrics

QUIET = ["checkpoint.export=false", "eval.interval=0"]


def train(ranks, run_dir: Path, args: list[str]) -> list[dict]:
    ranks.train(["recipe=qwen3_moe_debug", *args, f"run.dir={run_dir}"])
    return read_metrics(run_dir)


@pytest.mark.slow
def test_loss_falls_on_the_default_corpus(tmp_path, tiny, ranks):
    records = train(ranks, tmp_path / "run", [*tiny, *QUIET, "train.steps=60", "optim.lr=5e-3", "optim.warmup_steps=5", "train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=8"])
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert first > 6.0  # about ln(1024) at init
    assert last < first - 1.0, [round(r["loss"], 3) for r in records]


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path, tiny, ranks):
    # Samples hold different numbers of targets (padding, document starts), so this holds only
    # if the loss is normalized by the global target count rather than per micro-batch.
    # The load-balancing loss is off: it balances each micro-batch, so it differs here by design.
    common = [*tiny, *QUIET, "train.steps=3", "train.global_batch_size=4", "checkpoint.interval=0", "moe.aux_loss_coef=0"]
    whole = train(ranks, tmp_path / "a", [*common, "train.micro_batch_size=4"])
    accumulated = train(ranks, tmp_path / "b", [*common, "train.micro_batch_size=1"])
    for a, b in zip(whole, accumulated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def read_wandb_records(run_file: Path, kind: str) -> list:
    """The records of one type ("history", "run", ...) of an offline `.wandb` file (a
    LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = run_file.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, record_kind = struct.unpack("<IHB", data[pos : pos + 7])
        if record_kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if record_kind in (1, 2) else pending + chunk
        if record_kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == kind:
                records.append(getattr(record, kind))
    return records


def read_wandb_history(run_file: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): item.value_json for item in h.item} for h in read_wandb_records(run_file, "history")]


@pytest.mark.slow
def test_resume_after_a_crash_repeats_the_uninterrupted_run(tmp_path, tiny, ranks):
    args = [*tiny, *QUIET, "train.steps=6", "checkpoint.interval=3", "checkpoint.keep=0", "logging.wandb.mode=offline"]
    full = train(ranks, tmp_path / "full", args)
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]

    # the wandb offline run holds every logged step with the same losses as metrics.jsonl
    (first_run,) = list((tmp_path / "full" / "wandb").glob("offline-run-*"))
    history = read_wandb_history(next(first_run.glob("run-*.wandb")))
    assert [int(h["_step"]) for h in history] == [1, 2, 3, 4, 5, 6]
    assert [float(h["loss"]) for h in history] == pytest.approx([r["loss"] for r in full], rel=1e-6)

    # a real crash at step 6: steps 4 and 5 are logged (metrics.jsonl, wandb) but not checkpointed
    run_dir = tmp_path / "run"
    assert ranks.run(["recipe=qwen3_moe_debug", *args, f"run.dir={run_dir}"], env={"DISTRAIN_FAULT": "raise@step:step=6"}) == [1]
    assert "injected fault" in ranks.job_logs(1)[0]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    resumed = train(ranks, run_dir, args)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # rewound to step 3, then 4-6 once
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    # the resumed wandb run is the same run, rewound to step 3: it logs 4-6 again
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    (run_record,) = read_wandb_records(next(runs[1].glob("run-*.wandb")), "run")
    assert (run_record.branch_point.run, run_record.branch_point.value) == (runs[0].name.split("-")[-1], 3)
    assert [int(h["_step"]) for h in read_wandb_history(next(runs[1].glob("run-*.wandb")))] == [4, 5, 6]


def test_incomplete_checkpoint_is_ignored(tmp_path, tiny, ranks):
    run_dir = tmp_path / "run"
    train(ranks, run_dir, [*tiny, *QUIET, "train.steps=2", "checkpoint.interval=1", "checkpoint.keep=0"])
    # a crash mid-save leaves a .tmp folder: resume must take the newest complete checkpoint
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", run_dir / "checkpoints" / "step_00000003.tmp")
    (run_dir / "checkpoints" / "step_00000003.tmp" / ".metadata").unlink()
    train(ranks, run_dir, [*tiny, *QUIET, "train.steps=3"])
    out = ranks.job_logs(1)[0]
    assert "resuming from" in out and "step_00000002 at step 2" in out, out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name[0] != ".") == ["step_00000002", "step_00000003"]  # keep=2, no .tmp
    assert (run_dir / "checkpoints" / "step_00000003" / ".metadata").exists()


def test_local_jsonl_dataset_with_an_autotokenizer(tmp_path, tiny, data_cache, ranks):
    import json

    from distrain.config.schema import DataConfig
    from distrain.data.corpus import load_corpus

    tokenizer_dir = load_corpus(DataConfig(vocab_size=1024, max_bytes=600_000, cache_dir=str(data_cache))).tokenizer_dir
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 7)}) for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    args = [*tiny, *QUIET, "data=local_jsonl", f"data.files=[{tmp_path / 'docs.jsonl'}]", f"data.tokenizer={tokenizer_dir}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.steps=3"]
    records = train(ranks, tmp_path / "run", args)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert list((tmp_path / "cache").glob("hf-*/train_tokens.bin"))  # tokenized through datasets into a token store


def test_rewinding_metrics_reads_only_the_tail(tmp_path, monkeypatch):
    """A resume moves the records after the checkpoint's step to metrics.rewound.jsonl (a torn
    last line too) and parses only those and the last one kept, however long the run's file."""
    import json

    from distrain.metrics import sinks

    counts = [[7] * 128 for _ in range(4)]  # per-layer, per-expert token counts, as MoE runs log
    records = [json.dumps({"step": s, "loss": 1.0 / s, "moe_tokens_per_expert": counts}) + "\n" for s in range(1, 3001)]
    (tmp_path / "metrics.jsonl").write_text("".join(records) + '{"step": 3001, "lo')
    parsed = []
    monkeypatch.setattr(sinks, "_step_of", lambda line, parse=sinks._step_of: parsed.append(line) or parse(line))
    assert sinks.rewind_metrics(tmp_path, 2990) == 11
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(records[:2990])
    assert (tmp_path / "metrics.rewound.jsonl").read_text() == "".join(records[2990:]) + '{"step": 3001, "lo\n'
    assert len(parsed) <= 12 + 2, len(parsed)  # the 11 dropped and the kept step 2990 (and empty line ends)
    assert sinks.rewind_metrics(tmp_path, 2990) == 0 and len(parsed) <= 2 * 14


def test_export_shards_start_a_new_file_before_the_header_overflows(tmp_path, monkeypatch):
    """Many small tensors far into a shard (long offsets, as in a 50 GB shard of a 30B MoE's
    expert weights): each shard's header fits its reserved space and a new shard starts in time."""
    import json

    import torch

    from distrain.checkpoint.export import _ShardWriter

    monkeypatch.setattr(_ShardWriter, "HEADER_SPACE", 4096)
    writer = _ShardWriter(tmp_path, 1 << 40)
    for i in range(120):
        fresh = writer.file is None
        writer.add(f"e.{i}", torch.full((6,), float(i)))
        if fresh:
            writer.offset = 10**12  # the offsets of a shard far in (the data itself stays small)
    writer.close(total_parameters=0)
    count, keys = len(writer.written), []
    assert count > 2
    for i in range(count):
        data = (tmp_path / f"model-{i + 1:05d}-of-{count:05d}.safetensors").read_bytes()
        size = int.from_bytes(data[:8], "little")
        assert size == 4096 - 8
        keys += [k for k in json.loads(data[8 : 8 + size]) if k != "__metadata__"]
    assert keys == [f"e.{i}" for i in range(120)]


def test_rng_streams_of_neighbouring_seeds_are_distinct():
    """Each data-parallel rank's RNG stream (dropout, router jitter) is its own across runs too:
    rank 1 of run.seed=0 does not replay rank 0 of run.seed=1."""
    from distrain.train.trainer import rng_seed

    seeds = {(seed, rank): rng_seed(seed, rank) for seed in range(16) for rank in range(64)}
    assert len(set(seeds.values())) == len(seeds)
    assert rng_seed(0, 3) == rng_seed(0, 3)
