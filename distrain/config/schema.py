"""The run's configuration: plain frozen dataclasses, the only config objects below the CLI.

Hydra composes YAML into a dict; `distrain.config.load.to_job_config` turns that dict into a
`JobConfig`, checking every key, type and value here, before any process group or model exists.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A user-fixable configuration problem; the CLI prints it on one line and exits 2."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class ModelConfig:
    # A hub id (needs a network), or a local folder written by `save_pretrained`; weights are
    # loaded from it when present and `load_weights` is true.
    name_or_path: Optional[str] = None
    # An inline model: a transformers `model_type` (e.g. "qwen3_moe", "llama") built with random
    # weights, with `config` giving its sizes. `config` also overrides keys of a loaded config.
    architecture: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)
    load_weights: bool = True
    # auto: sdpa where the model supports it, else eager (the start-up block says which)
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"

    def validate(self) -> None:
        _require(
            (self.name_or_path is None) != (self.architecture is None),
            "model: set exactly one of model.name_or_path (hub id or local folder) and "
            f"model.architecture (inline model type); got name_or_path={self.name_or_path!r}, "
            f"architecture={self.architecture!r}",
        )


@dataclass(frozen=True)
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 fills the rest of the world
    tp: int = 1
    sp: bool = False
    ep: int = 1
    # FSDP: free each block's gathered parameters after its forward (gather again for backward)
    reshard_after_forward: bool = True
    # FSDP units: consecutive decoder blocks join one unit until it holds at least this many MB of
    # parameters (fp32, whole, experts included): each unit is one all-gather and one reduce-scatter,
    # so small blocks share collectives (latency-bound) instead of paying one each; blocks of that
    # size or more get a unit each. The last unit stays gathered from its forward to its backward
    # (which follows at once). A model smaller than this is one unit. 0: one unit per block.
    fsdp_unit_mb: float = 25.0
    cpu_offload: bool = False  # FSDP keeps sharded parameters, gradients and optimizer on the host
    # With gradient accumulation, when FSDP reduces gradients: micro_batch (reduce-scatter after each
    # micro-batch's backward: gradients stay sharded; with dp_replicate > 1 the all-reduce over the
    # replicas still happens once per step), or step (after the last micro-batch only: 1/m of the
    # reduce-scatter bytes for m micro-batches, but every rank holds the whole model's fp32
    # gradients unsharded from the first micro-batch to the last)
    grad_sync: Literal["micro_batch", "step"] = "micro_batch"
    # Recompute activations in backward: none, full (whole blocks), or selective (keep the
    # outputs of matmuls, attention and collectives, recompute the cheap element-wise ops)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False  # torch.compile each decoder block

    def validate(self) -> None:
        for key in ("dp_replicate", "tp", "ep"):
            value = getattr(self, key)
            _require(value >= 1, f"parallel.{key}={value}: must be >= 1 (e.g. parallel.{key}=1)")
        _require(
            self.dp_shard == -1 or self.dp_shard >= 1,
            f"parallel.dp_shard={self.dp_shard}: must be >= 1, or -1 to fill the rest of the world",
        )
        _require(0 <= self.fsdp_unit_mb < float("inf"), f"parallel.fsdp_unit_mb={self.fsdp_unit_mb}: must be a number >= 0 (0: one FSDP unit per block)")
        _require(
            not (self.cpu_offload and self.grad_sync == "step"),
            "parallel.grad_sync=step holds every gradient unsharded on the device between micro-batches, which "
            "parallel.cpu_offload=true exists to avoid; use parallel.grad_sync=micro_batch",
        )


@dataclass(frozen=True)
class MoEConfig:
    # How the experts' GEMMs run: torch (torch's grouped_mm), triton (distrain's Triton kernels:
    # CUDA, or the interpreter with TRITON_INTERPRET=1), auto (triton on CUDA, torch elsewhere)
    kernel: Literal["auto", "torch", "triton"] = "auto"
    # Auxiliary load-balancing loss (Switch / Mixtral: num_experts x sum over experts of the
    # fraction of routed tokens x the mean router probability), from each micro-batch's token
    # counts over all data-parallel ranks, averaged over the MoE layers. null: the model's
    # router_aux_loss_coef (0 when it has none); 0 disables it.
    aux_loss_coef: Optional[float] = None
    # Auxiliary-loss-free balancing (DeepSeek-V3): after each step, every router's
    # e_score_correction_bias moves by this much per expert toward balance (up for experts below
    # the mean load of the step's global batch, down above it). null: 0.001 on routers that carry
    # such a bias, off elsewhere; a value > 0 on a model without one is a config error.
    bias_update_rate: Optional[float] = None
    # Token dropping: each expert takes at most ceil(capacity_factor x T x K / E) of the T x K
    # (token, expert) pairs of the tokens one rank routes together (a micro-batch, or under TP x EP
    # its sequence slice), the earliest in token order; the others add nothing (the token keeps its
    # residual and its other experts). null: no token is ever dropped.
    capacity_factor: Optional[float] = None
    # Expert parallelism: each rank's routed rows travel to their experts in this many pieces (a
    # share of every expert's rows each), so that one piece's expert GEMMs run while the next
    # piece's all-to-all is in flight and the previous one's comes back. 1: one exchange each way.
    dispatch_chunks: int = 1

    def validate(self) -> None:
        _require(
            self.aux_loss_coef is None or (0 <= self.aux_loss_coef < float("inf")),
            f"moe.aux_loss_coef={self.aux_loss_coef}: must be a finite number >= 0 (0 disables), or null for the model's own",
        )
        _require(
            self.bias_update_rate is None or (0 <= self.bias_update_rate < float("inf")),
            f"moe.bias_update_rate={self.bias_update_rate}: must be a finite number >= 0 (0 disables), or null",
        )
        _require(
            self.capacity_factor is None or (0 < self.capacity_factor < float("inf")),
            f"moe.capacity_factor={self.capacity_factor}: must be a finite number > 0 (e.g. 1.25), or null to drop no token",
        )
        _require(
            isinstance(self.dispatch_chunks, int) and self.dispatch_chunks >= 1,
            f"moe.dispatch_chunks={self.dispatch_chunks}: must be an integer >= 1 (1: each all-to-all in one piece; 2 overlaps them with the experts' GEMMs)",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    # weight decay on 1-D parameters (norm gains, biases) too: off, as in Megatron-LM and HF's Trainer
    decay_norms_and_biases: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Learning-rate schedule: linear warmup, then cosine to min_lr_ratio * lr, or
    # warmup-stable-decay (wsd): flat, then linear decay over the last decay_ratio of the steps.
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr}: must be > 0 (e.g. optim.lr=3e-4)")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}: must be >= 0")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"optim.{key}={value}: must be in [0, 1) (e.g. 0.9)")
        _require(self.eps > 0, f"optim.eps={self.eps}: must be > 0 (e.g. 1e-8)")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        _require(0 <= self.decay_ratio <= 1, f"optim.decay_ratio={self.decay_ratio}: must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    # Samples (packed sequences of seq_len tokens) per optimizer step over the whole run; each
    # data-parallel rank takes global_batch_size / dp of them, micro_batch_size at a time.
    global_batch_size: int = 8
    micro_batch_size: int = 8
    seq_len: int = 256
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    # "auto": bf16 compute with fp32 master weights on CUDA, fp32 on CPU.
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # A step whose loss or gradient norm is not finite (NaN/inf) changes nothing (weights,
    # optimizer state); "skip" goes on with the next batch, "stop" ends the run (exit 3).
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_steps: int = 10  # consecutive skipped steps after which the run stops anyway

    def validate(self) -> None:
        _require(self.steps >= 1, f"train.steps={self.steps}: must be >= 1 (e.g. train.steps=100)")
        _require(self.seq_len >= 2, f"train.seq_len={self.seq_len}: must be >= 2 (e.g. train.seq_len=256)")
        _require(self.micro_batch_size >= 1, f"train.micro_batch_size={self.micro_batch_size}: must be >= 1")
        _require(
            self.global_batch_size >= 1 and self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size={self.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size={self.micro_batch_size} (e.g. train.global_batch_size="
            f"{self.micro_batch_size * max(1, self.global_batch_size // self.micro_batch_size)})",
        )
        _require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables clipping)")
        _require(self.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps={self.max_nonfinite_steps}: must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    # "stdlib": the Python standard library's own source files (offline, on every machine), with a
    # byte-level BPE tokenizer trained on them and cached. "hf": a `datasets` dataset.
    source: Literal["stdlib", "hf"] = "stdlib"
    # For source=hf: a hub dataset name (needs a network) or a loader name ("json", "parquet",
    # "text") with local `files`.
    dataset: Optional[str] = None
    files: list[str] = field(default_factory=list)
    dataset_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # For source=hf: an AutoTokenizer folder or hub id. For source=stdlib: built and cached.
    tokenizer: Optional[str] = None
    vocab_size: int = 4096  # of the built tokenizer
    max_bytes: int = 8_000_000  # of the stdlib corpus, taken in sorted path order
    eval_fraction: float = 0.02  # documents held out for eval
    cache_dir: str = "~/.cache/distrain"  # token stores (one folder each, built once, memory-mapped by every rank)
    num_proc: Optional[int] = None  # processes tokenizing a source=hf dataset into its store; null: min(8, CPUs)
    # Documents packed into one sample attend only to themselves: position ids restart at each
    # document, which transformers turns into a block-diagonal mask. A model whose forward does not
    # isolate them so is refused before spawn. false: packed samples attend across documents
    # (positions run 0..seq_len-1), for any model.
    document_masking: bool = True

    def validate(self) -> None:
        if self.source == "hf":
            _require(self.dataset is not None, "data.source=hf needs data.dataset (a hub name, or json/parquet/text with data.files)")
            _require(self.tokenizer is not None, "data.source=hf needs data.tokenizer (an AutoTokenizer folder or hub id)")
        _require(self.vocab_size >= 300, f"data.vocab_size={self.vocab_size}: must be >= 300 (byte-level BPE needs 256 bytes plus merges)")
        _require(self.max_bytes > 0, f"data.max_bytes={self.max_bytes}: must be > 0")
        _require(0 < self.eval_fraction < 1, f"data.eval_fraction={self.eval_fraction}: must be in (0, 1), e.g. 0.02")
        _require(self.num_proc is None or self.num_proc >= 1, f"data.num_proc={self.num_proc}: must be >= 1 or null (min(8, CPUs))")


@dataclass(frozen=True)
class EvalConfig:
    interval: int = 50  # steps between eval losses; 0 disables eval
    batches: int = 4  # eval size: batches x train.micro_batch_size held-out samples, split over ranks

    def validate(self) -> None:
        _require(self.interval >= 0, f"eval.interval={self.interval}: must be >= 0 (0 disables eval)")
        _require(self.batches >= 1, f"eval.batches={self.batches}: must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 50  # steps between checkpoints; 0 saves only at the end
    keep: int = 2  # newest complete checkpoints kept; 0 keeps all
    # auto: the newest complete checkpoint in run.dir/checkpoints, if any; never: start fresh (in
    # a run.dir without checkpoints); or the path of a checkpoint a new run starts from (once the
    # run has checkpoints of its own, it continues from those). true / false mean auto / never.
    resume: Union[bool, str] = "auto"
    export: bool = True  # write run.dir/export (safetensors, from_pretrained-loadable) at the end
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the exported weights
    export_shard_size: str = "5GB"  # the largest safetensors file of an export (hub style: 5GB, 500MB, 2GiB)
    # A hub model repo id (user/name) the end-of-run export is uploaded to with huggingface_hub
    # (created private if missing; needs a network and a token). null: no upload.
    push_to_hub: Optional[str] = None
    # Write checkpoints in the background (DCP async save): training goes on while the files are
    # written; the next save and the end of the run wait for it. Costs host memory for one copy
    # of this rank's shards.
    async_: bool = field(default=False, metadata={"key": "async"})

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):
            object.__setattr__(self, "resume", "auto" if self.resume else "never")

    def validate(self) -> None:
        _require(self.interval >= 0, f"checkpoint.interval={self.interval}: must be >= 0")
        _require(self.keep >= 0, f"checkpoint.keep={self.keep}: must be >= 0 (0 keeps all)")
        _require(self.resume != "", "checkpoint.resume is empty: use auto, never or the path of a checkpoint folder")
        _require(_size_or_none(self.export_shard_size) is not None,
                 f"checkpoint.export_shard_size={self.export_shard_size!r}: write it as bytes or e.g. 5GB, 500MB, 2GiB")
        _require(self.push_to_hub is None or re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub) is not None,
                 f"checkpoint.push_to_hub={self.push_to_hub!r}: must be a hub repo id, user/name")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "distrain"
    entity: Optional[str] = None


@dataclass(frozen=True)
class LoggingConfig:
    interval: int = 1  # steps between metric records
    console: Literal["progress", "plain"] = "plain"
    # Peak FLOP/s of one device for MFU, on any device (over the GPU table). null: looked up for
    # known GPUs, else cpu_peak_flops on a CPU run, else no MFU.
    peak_flops: Optional[float] = None
    # A CPU's peak, used only where the run trains on the CPU (a recipe's CPU figure gives no
    # MFU of 250% when the same recipe runs on a GPU).
    cpu_peak_flops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        _require(self.interval >= 1, f"logging.interval={self.interval}: must be >= 1")
        for key in ("peak_flops", "cpu_peak_flops"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"logging.{key}={value}: must be > 0 or null")


@dataclass(frozen=True)
class ProfileConfig:
    # [a, b]: a torch.profiler trace of steps a..b (inclusive, counted like train.steps) into
    # run.dir/profile/trace_rank<r>.json on every rank (Chrome trace: open in ui.perfetto.dev or
    # chrome://tracing); empty: no profiling.
    steps: list[int] = field(default_factory=list)
    # Also record memory over those steps: allocations in the trace, and on CUDA a snapshot of the
    # caching allocator (run.dir/profile/memory_rank<r>.pickle: drag onto pytorch.org/memory_viz).
    memory: bool = False

    def validate(self) -> None:
        _require(
            self.steps == [] or (len(self.steps) == 2 and 1 <= self.steps[0] <= self.steps[1]),
            f"profile.steps={self.steps}: must be [first, last] with 1 <= first <= last (e.g. profile.steps=[5,6]), or [] for none",
        )
        _require(not self.memory or self.steps != [], "profile.memory=true records over profile.steps: set them too (e.g. profile.steps=[5,6])")


@dataclass(frozen=True)
class LauncherConfig:
    nproc_per_node: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Bounds every collective (a dead or hung peer ends the job within it) and the time workers
    # get to save a checkpoint and exit after a stop signal, before they are killed.
    timeout_s: int = 300

    def validate(self) -> None:
        _require(self.nproc_per_node >= 1, f"launcher.nproc_per_node={self.nproc_per_node}: must be >= 1")
        _require(self.timeout_s >= 1, f"launcher.timeout_s={self.timeout_s}: must be >= 1")


@dataclass(frozen=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def parse_size(size) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (ValueError otherwise)."""
    bytes_ = _size_or_none(size)
    if bytes_ is None:
        raise ValueError(f"size {size!r}: write it as a number of bytes or e.g. 5GB, 500MB, 2GiB")
    return bytes_


def _size_or_none(size) -> Optional[int]:
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        return None
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    value = int(float(match.group(1)) * (1 if unit == "B" else base ** ("KMGT".index(unit[0]) + 1)))
    return value if value > 0 else None
