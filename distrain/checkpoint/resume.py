"""Which checkpoint a run resumes from, and whether it may.

`checkpoint.resume`:
- `auto`: the newest complete checkpoint in `run.dir/checkpoints`; one that fails
  `check_complete` (a truncated shard, a missing `.metadata`), or whose contents fail to load
  (`Trainer`), is set aside as `*.corrupt`, with a warning, and the one before it is used; none:
  start from scratch;
- `never`: start from scratch, in a run directory that holds no checkpoints (a requeued Slurm
  job, `SLURM_RESTART_COUNT` > 0, continues its own checkpoints as with `auto`);
- a path: the checkpoint a new run starts from (e.g. another run's), which must be complete.
  Once the run has checkpoints of its own, it resumes those, so rerunning the same command (or a
  requeue) continues the run instead of going back to the path.

A resume continues the same data stream at the same sample index, so what defines the stream
(`run.seed`, `train.seq_len`, the data fingerprint) must not change: such a resume is refused
with the key and how to start fresh. Every other changed key is allowed and reported; the config
wins (optimizer hyperparameters included). Nothing is deleted: broken checkpoints are renamed.

`choose` has no side effects: the CLI calls it before any worker starts (to fail with exit 2),
and rank 0 calls it again, holding the run directory's lock, then `set_aside` applies it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from distrain.checkpoint.dcp import check_complete, list_checkpoints, read_train_state
from distrain.config import ConfigError, JobConfig, to_dict

STREAM_KEYS = {"seed": "run.seed", "seq_len": "train.seq_len"}


@dataclass
class Resume:
    path: Path | None  # None: from scratch
    set_aside: list[tuple[Path, str]] = field(default_factory=list)  # (checkpoint, why): renamed to *.why
    # with auto: the older checkpoints, newest first, for a `path` whose contents fail to load
    fallbacks: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return 0 if self.path is None else checkpoint_step_of(self.path)


def checkpoint_step_of(path: Path) -> int:
    return int(read_train_state(path)["step"])


def choose(job: JobConfig, data_fingerprint: str | None = None) -> Resume:
    checkpoints_dir = Path(job.run.dir) / "checkpoints"
    existing = list_checkpoints(checkpoints_dir)
    resume = Resume(path=None)
    mode = job.checkpoint.resume
    if mode == "never" and existing and int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0:
        raise ConfigError(
            f"checkpoint.resume=never but {checkpoints_dir} holds checkpoints ({existing[-1].name} the newest): "
            "starting over there would overwrite them; resume with checkpoint.resume=auto, or pick a new run.dir"
        )
    if mode not in ("auto", "never") and existing:
        resume.warnings.append(f"checkpoint.resume={mode} is ignored: the run has checkpoints of its own, it continues from them")
    if mode not in ("auto", "never") and not existing:
        path = Path(mode).expanduser()
        problem = check_complete(path)
        if problem is not None:
            raise ConfigError(
                f"checkpoint.resume={mode}: {problem}; pass a complete checkpoint folder "
                "(run.dir/checkpoints/step_NNNNNNNN), or checkpoint.resume=auto for the newest complete one"
            )
        resume.path = path.resolve()
    else:
        for i, candidate in enumerate(reversed(existing)):
            problem = check_complete(candidate)
            if problem is None:
                resume.path = candidate
                resume.fallbacks = list(reversed(existing))[i + 1 :]
                break
            resume.set_aside.append((candidate, "corrupt"))
            resume.warnings.append(f"warning: checkpoint {candidate} is unusable ({problem}); set aside as {candidate.name}.corrupt, trying the one before")
    if resume.path is not None:
        check_same_stream(job, resume.path, data_fingerprint)
        check_same_model(job, resume.path)
    return resume


def check_same_model(job: JobConfig, path: Path) -> None:
    """The checkpoint's model tensors (names and shapes, from its DCP metadata) must be this run's
    model's, or ConfigError naming the first difference and the model keys that changed."""
    import torch.distributed.checkpoint as dcp

    from distrain.models import build_config, meta_model

    stored = {key.removeprefix("model."): list(meta.size) for key, meta in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
              if key.startswith("model.") and hasattr(meta, "size")}
    wanted = {name: list(t.shape) for name, t in meta_model(build_config(job.model)).state_dict().items()}
    if stored == wanted:
        return
    differs = sorted(set(stored) ^ set(wanted)) or sorted(k for k in wanted if stored[k] != wanted[k])
    first = differs[0]
    what = (f"{first} is {stored[first]} in the checkpoint and {wanted[first]} in this run" if first in stored and first in wanted
            else f"{first} is only in {'the checkpoint' if first in stored else 'this run'}")
    changed = _model_changes(job, path)
    raise ConfigError(
        f"model: checkpoint {path} holds another model ({what}; {len(differs)} tensors differ"
        + (f"; changed: {', '.join(changed[:3])}" if changed else "")
        + "); resume with the checkpoint's model settings, or start fresh in another run.dir (or set checkpoint.resume=never there)"
    )


def check_same_stream(job: JobConfig, path: Path, data_fingerprint: str | None) -> None:
    data = read_train_state(path).get("data", {})
    fresh = "start fresh in another run.dir (or set checkpoint.resume=never there)"
    current = {"seed": job.run.seed, "seq_len": job.train.seq_len}
    for name, key in STREAM_KEYS.items():
        if name in data and data[name] != current[name]:
            raise ConfigError(
                f"{key}={current[name]}: checkpoint {path} was trained with {key}={data[name]}; resuming with another value "
                f"would continue at sample {data.get('position', '?')} of a different data stream; use {key}={data[name]} to resume, or {fresh}"
            )
    if data_fingerprint is not None and data.get("fingerprint") not in (None, data_fingerprint):
        raise ConfigError(
            f"data: checkpoint {path} was trained on data {data['fingerprint']}, this run's data.* settings give "
            f"{data_fingerprint} (another dataset, tokenizer or split); use the checkpoint's data settings to resume, or {fresh}"
        )


def _model_changes(job: JobConfig, path: Path) -> list[str]:
    """`model.key: before -> now` for the model keys (those inside model.config too) this run changed."""
    import yaml

    before = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model", {})
    now = to_dict(job.model)
    flat = lambda d: {**{k: v for k, v in d.items() if k != "config"}, **{f"config.{k}": v for k, v in (d.get("config") or {}).items()}}  # noqa: E731
    before, now = flat(before), flat(now)
    return [f"model.{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]


def changed_keys(job: JobConfig, path: Path) -> list[str]:
    """`key: before -> now` for every config key this run sets differently from the checkpoint's
    (read as plain YAML: a checkpoint of an older distrain may hold keys this one lacks)."""
    import yaml

    before = _flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    now = _flatten(to_dict(job))
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key) and key != "run.dir"]


def set_aside(resume: Resume) -> list[str]:
    """Rename the checkpoints `choose` set aside; returns a line for each."""
    lines = []
    for path, why in resume.set_aside:
        target = path.with_name(f"{path.name}.{why}")
        suffix = 1
        while target.exists():
            suffix += 1
            target = path.with_name(f"{path.name}.{why}{suffix}")
        os.replace(path, target)
        lines.append(f"checkpoint {path.name} set aside as {target.name} (the run resumes from step {resume.step})")
    return lines


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "config":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
