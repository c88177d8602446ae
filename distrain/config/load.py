"""Compose a run's config with Hydra, then check it into a frozen `JobConfig`.

Hydra's compose API is used alone: it changes no working directory and writes no `.hydra`
folders or logs. Search path: the recipe's own folder, then `recipes/`, then `configs/`; so a
user's recipe can name a shipped recipe in its `defaults` list and override any key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from distrain.config.schema import ConfigError, JobConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"
RECIPES_DIR = REPO_ROOT / "recipes"


def _recipe_location(recipe: str) -> tuple[Path, str]:
    """A shipped recipe name or a user's YAML path -> (folder, config name)."""
    as_path = Path(recipe).expanduser()
    if recipe.endswith((".yaml", ".yml")) or os.sep in recipe:
        if not as_path.is_file():
            raise ConfigError(f"recipe={recipe}: no such file; pass a shipped recipe name ({_shipped()}) or a YAML path")
        return as_path.resolve().parent, as_path.stem
    if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
        raise ConfigError(f"recipe={recipe}: no such recipe; shipped recipes: {_shipped()}, or pass a YAML path")
    return RECIPES_DIR, recipe


def _shipped() -> str:
    return ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))


def _check_override_keys(overrides: list[str]) -> None:
    """Name unknown keys in `key=value` overrides ourselves: Hydra's message is several lines."""
    groups = {p.name for p in CONFIGS_DIR.iterdir() if p.is_dir()}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or key in groups or key.startswith("hydra"):
            continue
        _field_type(JobConfig, key.split("."), key)


def _keyed_fields(cls: Any) -> dict[str, dataclasses.Field]:
    """Config key -> field; a key that is a Python keyword (`checkpoint.async`) names its field
    in the field's metadata (`async_`)."""
    return {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}


def _field_type(cls: Any, parts: list[str], full_key: str) -> Any:
    if not parts:
        return cls
    if not dataclasses.is_dataclass(cls):
        return Any  # free-form dict (model.config): keys are the model config's own
    fields = _keyed_fields(cls)
    if parts[0] not in fields:
        raise ConfigError(f"{full_key}: unknown key '{parts[0]}'; valid keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return _field_type(_strip_optional(hints[fields[parts[0]].name]), parts[1:], full_key)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def compose(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """Compose configs/ + recipe + overrides into a plain dict (interpolations resolved)."""
    import yaml
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    folder, name = _recipe_location(recipe)
    _check_override_keys(overrides)
    # Every schema key exists with its default before the YAML layers merge on top, so any key can
    # be overridden whichever group option a recipe picked.
    ConfigStore.instance().store(name="distrain_schema", node=to_dict(JobConfig()))
    OmegaConf.register_new_resolver("distrain_run_id", run_id, replace=True)
    searchpath = f"hydra.searchpath=[file://{RECIPES_DIR},file://{CONFIGS_DIR}]"
    try:
        with initialize_config_dir(config_dir=str(folder), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=[searchpath, *overrides])
        data = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        first_line = str(error).strip().splitlines()[0]
        raise ConfigError(f"recipe={recipe}: {first_line}") from None
    except yaml.YAMLError as error:  # a recipe (or config) that is not valid YAML
        mark = getattr(error, "problem_mark", None)
        where = f"{mark.name}:{mark.line + 1}" if mark is not None else f"recipe={recipe}"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix that line") from None
    data.pop("hydra", None)
    return data


def run_id() -> str:
    """What names a run's default directory (`${distrain_run_id:}` in configs/base.yaml): the
    Slurm job id (with the step, after a job's first srun), which a requeued job keeps, so it
    finds its checkpoints; else torchrun's `--rdzv-id`, shared by every rank; else the time.
    Ranks still agree when their clocks differ: rank 0's config is the one every rank runs
    (`distrain.launch.worker.agree`)."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if job:
        # NOTE: another srun of the same allocation is another run; the batch script itself and
        #       the first srun (step 0, also after a requeue) name the job's run
        step = env.get("SLURM_STEP_ID", "")
        first = not step.isdigit() or int(step) == 0 or int(step) >= 0xFFFFFFF0  # batch/extern steps
        return f"job{job}" if first else f"job{job}.{step}"
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return env["TORCHELASTIC_RUN_ID"]
    import datetime

    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def to_job_config(data: dict[str, Any]) -> JobConfig:
    """Check a plain dict against the schema: unknown keys, types, then each section's values."""
    job = _build(JobConfig, data, prefix="")
    for section in dataclasses.fields(job):
        validate = getattr(getattr(job, section.name), "validate", None)
        if validate is not None:
            validate()
    return job


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    fields = _keyed_fields(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {fields[key].name: _convert(hints[fields[key].name], data[key], f"{prefix}{key}") for key in data}
    return cls(**values)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms[:-1]:  # several arms (bool or str): the first that takes the value
            try:
                return _convert(arm, value, key)
            except ConfigError:
                pass
        return _convert(arms[-1], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. {key}=[a,b]")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of keys")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 3e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def to_dict(job: Any) -> dict[str, Any]:
    """A config dataclass -> a plain dict under its config keys."""
    if not dataclasses.is_dataclass(job):
        return copy.deepcopy(job)
    return {key: to_dict(getattr(job, f.name)) for key, f in _keyed_fields(job).items()}


def load_job(recipe: str, overrides: list[str]) -> JobConfig:
    return to_job_config(compose(recipe, overrides))


def read_config_yaml(path: str | os.PathLike) -> JobConfig:
    """A run directory's resolved `config.yaml` -> JobConfig (used by workers and export)."""
    import yaml

    with open(path) as f:
        return to_job_config(yaml.safe_load(f))


def write_config_yaml(job: JobConfig, path: str | os.PathLike) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(to_dict(job), f, sort_keys=False)
