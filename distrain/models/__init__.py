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
class MoEBlock:
    """One MoE module of a decoder block, found by structure (`discover_moe`)."""

    name: str  # FQN of the MoE module (e.g. model.layers.3.mlp)
    module: nn.Module
    router: nn.Module  # its weight is [num_experts, hidden]
    router_name: str  # child name inside `module`
    experts: nn.Module  # holds the 3-D expert weights, experts first
    experts_name: str
    shared_expert: nn.Module | None = None  # a dense MLP every token goes through (Qwen2-MoE, DeepSeek-V3)
    shared_gate: nn.Module | None = None  # the shared expert's sigmoid gate (Qwen2-MoE)


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
    moe_blocks: list[MoEBlock] = field(default_factory=list)


def build_config(cfg: ModelConfig):
    """The HF config, with `model.config` keys applied; unknown keys are a config error."""
    from transformers import AutoConfig

    if cfg.architecture is not None:
        try:
            hf_config = AutoConfig.for_model(cfg.architecture)
        except ValueError:
            raise ConfigError(f"model.architecture={cfg.architecture}: not a transformers model_type; {_model_types_hint(cfg.architecture)}") from None
    else:
        hf_config = _pretrained_config(cfg.name_or_path)
    known = _config_keys(hf_config)
    for key, value in cfg.config.items():
        if key not in known:
            raise ConfigError(f"model.config.{key}: not a field of {type(hf_config).__name__}; check the spelling")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and _is_size(key):
            raise ConfigError(f"model.config.{key}={value}: a size or count must be > 0")
    if cfg.config:
        # built with the sizes rather than patched after: fields derived at construction (head_dim
        # from hidden_size and heads) must follow them
        if cfg.architecture is not None:
            hf_config = AutoConfig.for_model(cfg.architecture, **cfg.config)
        else:
            hf_config = _pretrained_config(cfg.name_or_path, **cfg.config)
    hf_config._attn_implementation = _attention(hf_config) if cfg.attn_implementation == "auto" else cfg.attn_implementation
    hf_config.use_cache = False
    return hf_config


def _attention(hf_config) -> str:
    """The best attention the model's code supports: torch's sdpa, else the eager reference."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    return "sdpa" if model_class is None or getattr(model_class, "_supports_sdpa", False) else "eager"


def _is_size(key: str) -> bool:
    return key.endswith(("_size", "_dim", "_layers", "_heads", "_experts", "_per_tok")) or key.startswith(("num_", "n_")) or key in (
        "d_model", "n_embd", "n_layer", "n_head")


def _model_types_hint(name: str) -> str:
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    close = difflib.get_close_matches(name, list(CONFIG_MAPPING_NAMES), n=4, cutoff=0.5)
    examples = close or ["qwen3_moe", "llama", "qwen3", "mistral", "mixtral", "gemma", "phi3"]
    return f"e.g. {', '.join(examples)} ({len(CONFIG_MAPPING_NAMES)} known to transformers)"


def _pretrained_config(name: str, **overrides):
    """AutoConfig of a local folder or hub id, each way it can fail told in one line."""
    import json
    import os

    from transformers import AutoConfig

    folder = Path(name).expanduser()
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "-"))
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model.name_or_path={name}: the folder has no config.json; pass a folder written by save_pretrained")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"model.name_or_path={name}: {config_file} is not valid JSON ({error}); fix or re-save it") from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type is not None and model_type not in CONFIG_MAPPING_NAMES:
            raise ConfigError(f"model.name_or_path={name}: config.json's model_type={model_type!r} is not one transformers knows; "
                              f"{_model_types_hint(str(model_type))}, or upgrade transformers")
    elif not hub_id:
        raise ConfigError(f"model.name_or_path={name}: no such folder, and not a hub id (user/name); pass a folder written by "
                          "save_pretrained or a hub id such as Qwen/Qwen3-0.6B")
    try:
        return AutoConfig.from_pretrained(name, **overrides)
    except (OSError, ValueError) as error:
        if folder.is_dir():
            raise ConfigError(f"model.name_or_path={name}: its config does not load ({str(error).splitlines()[0]})") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = ("the hub is offline (HF_HUB_OFFLINE is set) and it is not in the hub cache" if offline
               else "the hub could not be reached or has no such model")
        raise ConfigError(f"model.name_or_path={name}: no such folder here, and as a hub id it did not load: {why}; "
                          "pass a local folder written by save_pretrained, or check the id and the network") from None


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
    """The model of `hf_config` with fp32 parameters on the meta device (no memory, no init); MoE
    experts run distrain's experts forward (`distrain.moe.experts`)."""
    from transformers import AutoModelForCausalLM

    from distrain.moe import experts

    experts.register()
    implementation = hf_config._attn_implementation
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=implementation, experts_implementation=experts.IMPLEMENTATION, dtype=torch.float32
            )
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
    moe_blocks = discover_moe(model, blocks)
    num_experts = moe_blocks[0].experts.num_experts if moe_blocks else 0
    names = {id(m): n for n, m in model.named_modules()}
    expert_names = [f"{names[id(b.experts)]}.{n}" for b in moe_blocks for n, _ in b.experts.named_parameters()]
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
        experts_per_token=experts_per_token(model.config, moe_blocks[0].router) if moe_blocks else 0,
        expert_param_names=expert_names,
        moe_blocks=moe_blocks,
    )


# Config keys for the number of routed experts per token, across transformers' MoE models
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "num_experts_per_token", "top_k")


def experts_per_token(config, router: nn.Module) -> int:
    for value in (getattr(router, "top_k", None), *(getattr(config, key, None) for key in _TOP_K_KEYS)):
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"{type(config).__name__}: no experts-per-token count found (looked for {', '.join(_TOP_K_KEYS)})")


def discover_moe(model: nn.Module, blocks: nn.ModuleList) -> list[MoEBlock]:
    """The MoE modules of the decoder blocks, by structure: the parent of a module holding fused
    3-D expert weights (experts first, with transformers' `ExpertsInterface` attributes); beside
    the experts the router (a child whose weight is [num_experts, hidden]), and
    what else computes on every token: a shared expert (an MLP of linear projections) and its gate
    ([1, hidden]). Anything else there is refused: distrain would not know how it combines."""
    hidden = model.config.hidden_size
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for block in blocks:
        for moe in block.modules():
            experts_name, experts = next(((n, m) for n, m in moe.named_children() if _holds_experts(m)), (None, None))
            if experts is None:
                continue
            where = f"{type(model).__name__}'s MoE module {names[id(moe)]}"
            if not all(hasattr(experts, a) for a in ("num_experts", "has_gate", "is_transposed", "has_bias")):
                raise ConfigError(f"{where}: its experts ({type(experts).__name__}) do not use transformers' ExpertsInterface; distrain cannot run them")
            entry = MoEBlock(names[id(moe)], moe, None, None, experts, experts_name)
            for name, sub in moe.named_children():
                if sub is experts:
                    continue
                weight = getattr(sub, "weight", None)
                if weight is not None and tuple(weight.shape) == (experts.num_experts, hidden):
                    entry.router, entry.router_name = sub, name
                elif weight is not None and tuple(weight.shape) == (1, hidden):
                    entry.shared_gate = sub
                elif _is_mlp(sub, hidden):
                    entry.shared_expert = sub
                elif any(True for _ in sub.parameters()):
                    raise ConfigError(f"{where} holds {name} ({type(sub).__name__}), neither router, experts nor shared expert; distrain does not know how it combines")
            if entry.router is None:
                raise ConfigError(f"{where}: no router (a child with a [{experts.num_experts}, {hidden}] weight) beside its experts")
            found.append(entry)
    return found


def _holds_experts(module: nn.Module) -> bool:
    """Fused expert weights: two or more 3-D parameters of its own with the same leading size."""
    leading = [p.shape[0] for p in module.parameters(recurse=False) if p.ndim == 3]
    return len(leading) >= 2 and len(set(leading)) == 1


def _is_mlp(module: nn.Module, hidden: int) -> bool:
    linears = [m for m in module.children() if isinstance(m, nn.Linear)]
    return len(linears) >= 2 and linears[0].in_features == hidden and linears[-1].out_features == hidden


def _role(module: nn.Module) -> str:
    """A block child's role, from its structure (3-D expert weights) and class name."""
    kind = type(module).__name__.lower()
    if any(_holds_experts(m) for m in module.modules()):
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


@torch.no_grad()
def init_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers outside every state dict (rotary inv_freq, Gemma's embed_scale) are computed by the
    model's own init. It also re-inits the module's parameters, so it runs before they are
    loaded, and on their local shards: HF's init functions expect plain tensors."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if not any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            continue
        sharded = {name: p for name, p in module._parameters.items() if isinstance(p, DTensor)}
        for name, param in sharded.items():
            module._parameters[name] = nn.Parameter(param.to_local(), requires_grad=False)
        try:
            model._init_weights(module)
        finally:
            module._parameters.update(sharded)


def to_empty(model: nn.Module, device: torch.device) -> None:
    with keep_tied(model):
        model.to_empty(device=device)


# config keys shrunk for the document-isolation check: the property is the model code's (how it
# builds its attention mask), not its sizes
_TINY = dict(
    hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, ffn_hidden_size=64,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_hidden_layers=1,
    n_embd=64, n_layer=1, n_head=4, d_model=64, n_heads=4, n_layers=1, num_layers=1,
)
_TINY_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}


def document_leak(hf_config, documents: tuple[int, ...] = (5, 9, 10)) -> float:
    """How far the model's logits for documents packed into one sample, with position ids that
    restart at each document (`distrain.data.packing`), are from each document's logits alone:
    about 1e-7 where the forward isolates documents, large where attention crosses them. Runs a
    one-layer copy of the model at toy width (seeded random weights, CPU, fp32)."""
    from transformers import AutoModelForCausalLM

    from distrain.moe import experts

    experts.register()
    fields = hf_config.to_dict()
    layers = fields.get("num_hidden_layers")
    fields.update({k: v for k, v in _TINY.items() if k in fields or hasattr(hf_config, k)})
    heads, kv_heads = getattr(hf_config, "num_attention_heads", None), getattr(hf_config, "num_key_value_heads", None)
    if kv_heads is not None and kv_heads == heads:  # multi-head (or MLA) attention stays so
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    for key, value in list(fields.items()):
        if isinstance(value, list) and layers and len(value) == layers:  # per-layer lists (layer types)
            fields[key] = value[:1]
        elif key in _TINY_TOKENS and value is not None:  # inside the toy vocabulary
            fields[key] = _TINY_TOKENS[key]
    tiny = type(hf_config).from_dict(fields)
    tiny._attn_implementation = hf_config._attn_implementation
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny, attn_implementation=hf_config._attn_implementation, dtype=torch.float32).eval()
    ids = torch.randint(3, min(tiny.vocab_size, 128), (sum(documents),), generator=generator)
    positions = torch.cat([torch.arange(n) for n in documents])
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        leak, start = 0.0, 0
        for n in documents:
            alone = model(input_ids=ids[None, start : start + n], position_ids=positions[None, start : start + n], use_cache=False).logits[0]
            leak = max(leak, (packed[start : start + n] - alone).abs().max().item())
            start += n
    return leak
