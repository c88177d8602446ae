"""Build a transformers causal LM on the meta device and describe its structure (`ModelSpec`).

`model.name_or_path` is a hub id (needs a network) or a local `save_pretrained` folder;
`model.architecture` builds an inline model (random weights) from a `model_type` and sizes.
No rank ever holds the full model here: parameters exist only as meta tensors until the
parallelizer shards and materializes them.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distrain.config.schema import ConfigError, ModelConfig


@dataclass
class ModelSpec:
    blocks: nn.ModuleList  # the decoder blocks, the unit of FSDP / checkpointing
    block_class: str
    embeddings: nn.Module
    lm_head: nn.Module
    tied_embeddings: bool
    final_norm: nn.Module | None = None
    roles: dict[str, str] = field(default_factory=dict)  # block child -> attention | mlp | moe | norm | other
    num_experts: int = 0  # 0 for dense models
    experts_per_token: int = 0
    expert_param_names: list[str] = field(default_factory=list)


def build_config(cfg: ModelConfig):
    """The HF config, with `model.config` keys applied; unknown keys are a config error."""
    from transformers import AutoConfig

    if cfg.architecture is not None:
        try:
            hf_config = AutoConfig.for_model(cfg.architecture)
        except ValueError:
            from transformers import CONFIG_MAPPING

            raise ConfigError(
                f"model.architecture={cfg.architecture}: not a transformers model_type; e.g. "
                "qwen3_moe, llama, qwen3, mistral, mixtral, gemma, phi3"
                f" ({len(CONFIG_MAPPING)} known)"
            ) from None
    else:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path)
    known = _config_keys(hf_config)
    for key in cfg.config:
        if key not in known:
            raise ConfigError(f"model.config.{key}: not a field of {type(hf_config).__name__}; check the spelling")
    if cfg.config:
        # built with the sizes rather than patched after: fields derived at construction (head_dim
        # from hidden_size and heads) must follow them
        if cfg.architecture is not None:
            hf_config = AutoConfig.for_model(cfg.architecture, **cfg.config)
        else:
            hf_config = AutoConfig.from_pretrained(cfg.name_or_path, **cfg.config)
    hf_config._attn_implementation = cfg.attn_implementation
    hf_config.use_cache = False
    return hf_config


def _config_keys(hf_config) -> set[str]:
    """Keys a config accepts: its declared fields, plus extras its modeling code reads (head_dim)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    keys = set(type(hf_config)().to_dict()) | set(getattr(hf_config, "attribute_map", {}))
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    if model_class is not None:
        source = inspect.getsource(sys.modules[model_class.__module__])
        keys |= set(re.findall(r"config\.(\w+)", source))
        keys |= set(re.findall(r"getattr\(\s*(?:self\.)?config,\s*[\"'](\w+)", source))
    return keys


def meta_model(hf_config) -> nn.Module:
    """The model of `hf_config` with fp32 parameters on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    implementation = hf_config._attn_implementation
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, attn_implementation=implementation, dtype=torch.float32)
    except ValueError as error:
        if implementation not in str(error) and "attention implementation" not in str(error):
            raise
        raise ConfigError(
            f"model.attn_implementation={implementation}: {type(hf_config).__name__.removesuffix('Config')} does not support it; "
            "e.g. model.attn_implementation=eager"
        ) from None


def build_meta_model(cfg: ModelConfig, hf_config) -> tuple[nn.Module, ModelSpec]:
    model = meta_model(hf_config)
    return model, discover_spec(model)


def discover_spec(model: nn.Module) -> ModelSpec:
    """Find the blocks (a ModuleList of a `_no_split_modules` class), embeddings, head and experts."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    blocks = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in no_split:
            blocks = module
            break
    assert blocks is not None, f"{type(model).__name__}: no ModuleList of {sorted(no_split)} found"
    config = model.config
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    expert_names = [
        name for name, p in model.named_parameters() if num_experts and p.ndim == 3 and p.shape[0] == num_experts
    ]
    embeddings, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    norms = [m for m in model.base_model.children() if m is not blocks and "norm" in type(m).__name__.lower()]
    return ModelSpec(
        blocks=blocks,
        block_class=type(blocks[0]).__name__,
        embeddings=embeddings,
        lm_head=lm_head,
        tied_embeddings=lm_head.weight is embeddings.weight,
        final_norm=norms[-1] if norms else None,
        roles={name: _role(child) for name, child in blocks[0].named_children()},
        num_experts=num_experts,
        experts_per_token=getattr(config, "num_experts_per_tok", 0) if num_experts else 0,
        expert_param_names=expert_names,
    )


def _role(module: nn.Module) -> str:
    """A block child's role, from its structure (3-D expert weights) and class name."""
    kind = type(module).__name__.lower()
    if any(p.ndim == 3 for p in module.parameters()):
        return "moe"
    if "attention" in kind or "attn" in kind:
        return "attention"
    if "norm" in kind:
        return "norm"
    if any(isinstance(m, nn.Linear) for m in module.modules()):
        return "mlp"
    return "other"


def has_pretrained_weights(cfg: ModelConfig) -> bool:
    """Whether weights are to be loaded; the same answer on every rank (a config-only folder: no)."""
    if cfg.name_or_path is None or not cfg.load_weights:
        return False
    local = Path(cfg.name_or_path)
    if local.is_dir():
        return any(local.glob("*.safetensors")) or any(local.glob("*.bin"))
    return True  # a hub id


def pretrained_state_dict(cfg: ModelConfig, hf_config) -> dict[str, torch.Tensor]:
    """Full weights from `name_or_path` in the model's own parameter names (when
    `has_pretrained_weights`).

    transformers converts hub-format checkpoints (e.g. per-expert 2-D weights) to the in-memory
    format (fused 3-D experts) on load; loading through it keeps that conversion in one place.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=hf_config, dtype=torch.float32)
    return model.state_dict()


@contextlib.contextmanager
def keep_tied(model: nn.Module):
    """Re-tie parameters shared by several modules (tied embeddings) after an operation that
    replaces each use with its own tensor (to_empty, TP's distribute)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) in first:
                    ties.append((first[id(param)], (module, name)))
                else:
                    first[id(param)] = (module, name)
    yield
    for (owner, name), (tied_owner, tied_name) in ties:
        tied_owner._parameters[tied_name] = owner._parameters[name]


def to_empty(model: nn.Module, device: torch.device) -> None:
    with keep_tied(model):
        model.to_empty(device=device)
