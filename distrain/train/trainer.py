"""distrain's training loop: plain Python, built top to bottom in the order things exist.

Loss normalization: every micro-batch's summed cross-entropy is divided by the number of target
tokens in the whole global batch (all micro-batches, all data-parallel ranks), and gradients are
summed over data-parallel ranks. The step's loss is therefore the mean over every target token of
the global batch, whatever the micro-batch size, accumulation count or number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from distrain import faults
from distrain.checkpoint.dcp import Checkpointer, CheckpointLoadError, all_finite, checkpoint_name, load_checkpoint, read_train_state
from distrain.checkpoint.resume import Resume, set_aside
from distrain.config import JobConfig, to_dict
from distrain.config.schema import OptimConfig
from distrain.data.corpus import load_corpus
from distrain.data.loader import GlobalBatchLoader, eval_batches
from distrain.data.packing import IGNORE_INDEX, PackedDataset
from distrain.metrics.flops import flops_per_token, peak_flops
from distrain.metrics.profile import StepProfiler
from distrain.metrics.sinks import MetricsLogger, rewind_metrics
from distrain.models import build_config, build_meta_model, has_pretrained_weights, pretrained_state_dict
from distrain.parallel.grads import clip_, owned_square_sum
from distrain.moe.balance import RouterStats
from distrain.moe.experts import configure, resolve_kernel
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.tensor_parallel import sync_tp_grads, vocab_parallel_cross_entropy
from distrain.checkpoint.hf_import import load_sharded, map_keys, safetensors_folder
from distrain.parallel.parallelize import fill_from_rank0, fill_seeded, materialize, parallelize, reshard
from distrain.train import stop
from distrain.train.schedule import lr_multiplier


def rng_seed(seed: int, dp_rank: int) -> int:
    """The seed of data-parallel rank `dp_rank`'s RNG stream, hashed from (run.seed, rank): seed +
    rank would give rank 1 of seed 0 the stream of rank 0 of seed 1, so runs that differ only in
    their seed would share dropout masks and router jitter."""
    return zlib.crc32(f"{seed}:dp_rank:{dp_rank}".encode())


class Trainer:
    """`resume_from`: the checkpoints to resume from, rank 0's choice first, then the ones to fall
    back to if its contents fail to load (shared by every rank); empty: from scratch."""

    def __init__(self, job: JobConfig, device: torch.device, resume_from: list[Path] = ()):
        self.job, self.device = job, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(job.run.dir)
        self.bf16 = job.train.mixed_precision == "bf16" or (job.train.mixed_precision == "auto" and device.type == "cuda")

        # mesh
        hf_config = build_config(job.model)
        self.dims = ParallelDims.resolve(job.parallel, self.world_size, hf_config, job.train)
        self.mesh = self.dims.build_mesh(device.type)
        dp_mesh = self.mesh.dp_flat
        self.dp_rank, self.dp_size, self.dp_group = dp_mesh.get_local_rank(), dp_mesh.size(), dp_mesh.get_group()

        # data first: the tokenizer decides the vocabulary the model must cover
        corpus = load_corpus(job.data)
        assert corpus.train.vocab_size <= hf_config.vocab_size, "checked before spawn (distrain.cli)"
        self.hf_config = hf_config
        self.tokenizer_dir = corpus.tokenizer_dir
        self.train_loader = GlobalBatchLoader(
            PackedDataset(corpus.train, job.train.seq_len, job.data.document_masking),
            job.train.global_batch_size,
            job.train.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            job.run.seed,
        )
        self.eval_set = PackedDataset(corpus.eval, job.train.seq_len, job.data.document_masking)

        # model on meta -> parallelize -> materialize -> weights
        model, self.spec = build_meta_model(job.model, hf_config)
        self.dims.check_experts(self.spec.num_experts)  # checked before spawn too (distrain.cli)
        configure(self.spec.moe_blocks, job.moe.capacity_factor, resolve_kernel(job.moe.kernel, device.type), job.moe.dispatch_chunks)
        self.flops_per_token = flops_per_token(model, self.spec, job.train.seq_len)
        pretrained = has_pretrained_weights(job.model)
        folder = safetensors_folder(job.model.name_or_path, cached=True) if pretrained else None  # no hub call per rank
        keys = map_keys(model, folder) if folder is not None else None  # before FSDP renames the model's class
        self.tp_grads = parallelize(model, self.spec, self.dims, self.mesh, self.bf16)
        self.model = model
        materialize(self.model, device, self.dims.cpu_offload)
        if not pretrained:
            fill_seeded(self.model, hf_config, job.run.seed)
        elif keys is not None:
            load_sharded(self.model, keys)  # each rank reads its own shards
        else:  # weights only as .bin: loaded whole on rank 0, broadcast
            fill_from_rank0(self.model, device, pretrained_state_dict(job.model, hf_config) if self.is_main else None)
        self.router_stats = None
        if self.spec.moe_blocks:
            coef = job.moe.aux_loss_coef if job.moe.aux_loss_coef is not None else float(getattr(hf_config, "router_aux_loss_coef", 0) or 0)
            biased = any(hasattr(b.router, "e_score_correction_bias") for b in self.spec.moe_blocks)
            self.bias_update_rate = job.moe.bias_update_rate if job.moe.bias_update_rate is not None else (0.001 if biased else 0.0)
            # NOTE: under TP the MoE layers see the same tokens on every TP rank (expert-TP) or, with
            #       EP, each its own slice of them: counts are summed over dp, or over every rank
            if self.dims.tp > 1 and self.dims.ep > 1:
                self.router_stats = RouterStats(self.spec.moe_blocks, None, self.world_size, 1, coef, device)
            else:
                self.router_stats = RouterStats(self.spec.moe_blocks, self.dp_group, self.dp_size, self.dims.tp, coef, device)
        self.model.train()
        # NOTE: one RNG stream per data-parallel rank, the same on its TP ranks: anything random
        #       in a replicated region (router jitter, sampled routing, dropout) must agree there.
        stream_seed = rng_seed(job.run.seed, self.dp_rank)
        torch.manual_seed(stream_seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(stream_seed)

        # optimizer and schedule
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, job.optim), lr=job.optim.lr, foreach=True)
        # checkpoints and resume
        self.config_path = self.run_dir / "config.yaml"  # written by rank 0 (distrain.launch.run_dir)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", job.checkpoint.keep, job.checkpoint.async_, self.config_path, self.tokenizer_dir,
            device, datetime.timedelta(seconds=job.launcher.timeout_s),
        )
        self.step = self.saved_step = 0
        for i, path in enumerate(resume_from):
            try:
                state = load_checkpoint(path, self.model, self.optimizer, f"dp_{self.dp_rank}")
            except CheckpointLoadError as error:
                if i + 1 == len(resume_from):
                    raise CheckpointLoadError(f"{error}; move it aside (e.g. rename it {path.name}.corrupt) and rerun") from error
                if self.is_main:  # every rank failed alike: DCP gathers read errors
                    set_aside(Resume(path=resume_from[i + 1], set_aside=[(path, "corrupt")]))
                    moved = rewind_metrics(self.run_dir, read_train_state(resume_from[i + 1])["step"])
                    print(f"warning: {error}; set aside as {path.name}.corrupt, resuming from {resume_from[i + 1]} instead"
                          f" ({moved} records of metrics.jsonl moved to metrics.rewound.jsonl)", flush=True)
                continue
            self.step = self.saved_step = state["step"]
            self.train_loader.load_state_dict(state["data"])
            self.checkpointer.tidy(path)
            break
        # NOTE: the config wins over the hyperparameters a checkpoint brings back (rank 0 lists
        #       what changed); the learning rate is a function of the step alone, so the scheduler
        #       is rebuilt at the resumed step rather than loaded (its lists follow the layout).
        names = {param: name for name, param in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            group.update(_hyperparameters(_decayed(names[group["params"][0]], group["params"][0], job.optim), job.optim))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, job.train.steps, job.optim), last_epoch=self.step - 1
        )
        self.nonfinite_streak = 0

        self.peak_flops = peak_flops(device, job.logging.peak_flops, job.logging.cpu_peak_flops)
        self.state_bytes = None  # this rank's bytes of parameters, gradients, optimizer states
        self.metrics = MetricsLogger(job, self.run_dir, to_dict(job), self.step) if self.is_main else None
        self.profiler = StepProfiler(job.profile, self.run_dir, self.rank, device)

    def autocast(self):
        if self.bf16 and not self.dims.fsdp:  # with FSDP, its mixed-precision policy casts instead
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        if isinstance(logits, DTensor):  # TP: sharded on the vocabulary
            return vocab_parallel_cross_entropy(logits, batch["labels"], IGNORE_INDEX)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(value, group=self.dp_group)
        return value

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, list[int]]:
        """Forward, backward and (unless the step is not finite) the update. Returns the loss,
        the gradient norm and the flags every rank agreed on: [not finite, *stop signals]."""
        loss_sum = self.forward_backward(micro_batches)
        loss, grad_norm, flags = self.reduce_step(loss_sum)
        max_norm = self.job.train.grad_clip if self.job.train.grad_clip > 0 else float("inf")
        if not flags[0]:
            clip_(self.model.parameters(), grad_norm, max_norm)
            self.optimizer.step()
            if faults.active("nan", "weights", self.step + 1):
                _poison(self.model)
        if self.router_stats:
            self.router_stats.update_biases(self.bias_update_rate, applied=not flags[0])
        if self.state_bytes is None:
            self.state_bytes = {
                "param_bytes": _local_bytes(self.model.parameters()),
                "grad_bytes": _local_bytes(p.grad for p in self.model.parameters() if p.grad is not None),
                "optimizer_bytes": _local_bytes(v for s in self.optimizer.state.values() for k, v in s.items() if k != "step"),
            }
        self.scheduler.step()  # a skipped step still advances the schedule: the lr is a function of the step
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, flags

    def reduce_step(self, loss_sum: torch.Tensor) -> tuple[float, float, list[int]]:
        """One all-reduce (sum) over every rank, and one host sync, for all a step must agree on:
        the loss, the squared gradient norm (each rank adding the entries it owns), the stop
        signals received, and the router counts when they are only statistics. Values held alike
        by the TP ranks are added by TP rank 0 alone. Every rank gets the same sums, so every
        rank skips the same steps and stops after the same step."""
        tp_first = float(self.mesh.tp.get_local_rank() == 0)
        parts = [(loss_sum.double() * tp_first).reshape(1), owned_square_sum(self.model.parameters()).to(self.device).reshape(1),
                 torch.tensor(stop.received(), dtype=torch.float64, device=self.device)]
        pending = self.router_stats.take_pending() if self.router_stats else None
        agreed = sum(p.numel() for p in parts)  # loss, norm, signals: read on the host
        if pending is not None:
            # under TP x EP each TP rank routes its own slice of the sequence: every rank's counts
            parts.append(pending.reshape(-1) * (1.0 if self.dims.tp > 1 and self.dims.ep > 1 else tp_first))
        values = torch.cat(parts)
        if self.world_size > 1:
            dist.all_reduce(values)
        if pending is not None:
            self.router_stats.add_global(values[agreed:].reshape(pending.shape))
        loss, norm_sq, *signals = values[:agreed].tolist()
        grad_norm = math.sqrt(norm_sq) if norm_sq >= 0 else float("nan")
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        return loss, grad_norm, [int(nonfinite), *(int(s > 0) for s in signals)]

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradients of one global batch; return this rank's part of its loss
        (the sum over the data-parallel ranks is the mean per target token), not yet reduced."""
        if "global_targets" in micro_batches[0]:  # counted by every rank's loader alike
            num_targets = float(micro_batches[0]["global_targets"])
        else:  # batches made by hand (benchmarks): counted here, over the data-parallel ranks
            local = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches).to(self.device, torch.float32)
            num_targets = self._dp_sum(local).item()
        scale = 1.0 / max(num_targets, 1.0)
        if faults.active("nan", "loss", self.step + 1):
            scale = float("nan")
        loss_total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            self._grad_sync(last=i + 1 == len(micro_batches))
            with self.router_stats.recording() if self.router_stats else contextlib.nullcontext():
                loss = self._loss_sum(mb) * scale
            loss_total += loss.detach()
            aux = self.router_stats.aux_loss() if self.router_stats else None
            if aux is not None:
                loss = loss + aux / len(micro_batches)
            loss.backward()
        if self.dims.tp > 1:
            sync_tp_grads(self.model, self.tp_grads, self.mesh.tp.get_group())
        return loss_total

    def _grad_sync(self, last: bool) -> None:
        """Whether FSDP reduces this micro-batch's gradients (`parallel.grad_sync`). Over HSDP
        replicas they are all-reduced once per step either way: the reduce-scattered shards
        accumulate at no memory cost."""
        if not self.dims.fsdp:
            return
        if self.job.parallel.grad_sync == "step":
            self.model.set_requires_gradient_sync(last)
        elif self.dims.dp_replicate > 1:
            self.model.set_requires_all_reduce(last)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        num_samples = self.job.eval.batches * self.job.train.micro_batch_size
        batches = eval_batches(self.eval_set, num_samples, self.job.train.micro_batch_size, self.dp_rank, self.dp_size)
        totals = torch.zeros(2, device=self.device)
        for batch in batches:
            totals[0] += self._loss_sum(batch)
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
        reshard(self.model)
        self.model.train()
        totals = self._dp_sum(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def save(self) -> Path:
        """Checkpoint the current step, unless a non-finite value got into the weights: then no
        checkpoint is written (nor any pruned) and the run stops."""
        # NOTE: the weights alone: every applied step had a finite gradient norm, so every squared
        #       gradient was finite and Adam's moments are too; only the update (a huge lr, weights
        #       near the float limit) can overflow, and it lands in the weights.
        if not all_finite(self.model.parameters(), self.device):
            raise NonFiniteState(
                f"the weights hold non-finite values after step {self.step}; no checkpoint written, "
                f"the newest complete one is step {self.saved_step}"
            )
        train_state = {"step": self.step, "data": self.train_loader.state_dict()}
        rng_name = f"dp_{self.dp_rank}" if self.mesh.tp.get_local_rank() == 0 else None
        path = self.checkpointer.save(self.step, self.model, self.optimizer, train_state, rng_name)
        self.saved_step = self.step
        return path

    def startup_lines(self) -> list[str]:
        """What this run is, before step 1: model, layout, rank 0's memory, data, outputs."""
        from distrain.metrics.flops import active_params
        from distrain.parallel.plan import activation_bytes

        job, dims, mib = self.job, self.dims, 2**20
        total = sum(p.numel() for p in self.model.parameters())
        source = f"from {job.model.name_or_path}" if has_pretrained_weights(job.model) else f"random init (run.seed={job.run.seed})"
        layers = getattr(self.hf_config, "num_hidden_layers", "?")
        local = _local_bytes(self.model.parameters())
        mode = dims.activation_checkpointing
        activations = activation_bytes(job, dims, self.spec, self.hf_config)
        dataset = self.train_loader.dataset
        samples = len(dataset)
        consumed = job.train.steps * job.train.global_batch_size
        checkpoints = (f"every {job.checkpoint.interval} steps" if job.checkpoint.interval else "at the end") + f" in {self.run_dir / 'checkpoints'}"
        return [
            f"model   {self.hf_config.model_type}, {layers} layers: {total / 1e6:,.2f}M parameters, "
            f"{active_params(self.model, self.spec) / 1e6:,.2f}M active per token; {self.hf_config._attn_implementation} attention; {source}",
            f"layout  {self.world_size} rank(s), {self.device.type}: {dims.describe()}",
            f"memory  rank 0: {4 * local / mib:,.1f} MiB of training state (fp32 parameters {local / mib:,.1f}, gradients "
            f"{local / mib:,.1f}, Adam {2 * local / mib:,.1f}) + about {(activations[mode] + activations['logits']) / mib:,.1f} MiB "
            f"of activations per micro-batch (activation_checkpointing={mode}; `distrain plan` for details)",
            f"data    {job.data.source}: {dataset.num_tokens:,} training tokens, {samples:,} samples of {job.train.seq_len}; "
            f"{job.train.steps} steps x {job.train.global_batch_size} samples = {consumed / max(samples, 1):.2f} epochs",
            f"outputs checkpoints {checkpoints}; " + (f"export to {self.run_dir / 'export'}; " if job.checkpoint.export else "")
            + f"log in {self.run_dir / 'train.log'}",
        ]

    def say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def train(self) -> int:
        """Train to `train.steps`; return the exit status (0, or why the run stopped early)."""
        job = self.job
        if self.step >= job.train.steps:
            self.say(f"the checkpoint is at step {self.step}, train.steps={job.train.steps}: nothing to train")
        try:
            return self._train()
        finally:
            try:
                self.profiler.close()  # a run that stops inside the profiled steps still writes them
            except Exception as error:  # noqa: BLE001 - never mask how the run ended
                self.say(f"warning: the profile trace could not be written: {error}")

    def _train(self) -> int:
        job = self.job
        try:
            while self.step < job.train.steps:
                faults.fire("step", self.step + 1)
                lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
                with self.profiler.step(self.step + 1):
                    start = time.perf_counter()
                    loss, grad_norm, flags = self.train_step(self.train_loader.next_batch())
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    step_time = time.perf_counter() - start
                self.step += 1
                self.checkpointer.poll()
                nonfinite, stop_flags = flags[0], flags[1:]
                last = self.step == job.train.steps
                record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, **({"skipped": True} if nonfinite else {})}
                if job.eval.interval and (self.step % job.eval.interval == 0 or last) and not any(stop_flags):
                    record["eval_loss"] = self.evaluate()
                self.log(record, step_time, always=last or nonfinite)
                self.count_nonfinite(nonfinite, loss, grad_norm)
                if any(stop_flags) and not last:
                    return self.stop_on_request(stop_flags)
                if (job.checkpoint.interval and self.step % job.checkpoint.interval == 0) or last:
                    self.save()
            self.checkpointer.close()
        except NonFiniteState as error:
            self.checkpointer.close()
            self.say(f"distrain: stopped: {error}")
            return stop.EXIT_NONFINITE
        return 0

    def log(self, record: dict, step_time: float, always: bool) -> None:
        if not (always or self.step % self.job.logging.interval == 0 or "eval_loss" in record):
            return
        tokens_per_s = self.job.train.global_batch_size * self.job.train.seq_len / step_time
        record.update(
            tokens_per_s=tokens_per_s,
            mfu=None if self.peak_flops is None else tokens_per_s / self.world_size * self.flops_per_token / self.peak_flops,
            step_time_s=step_time,
            samples_consumed=self.train_loader.position,
            max_memory_bytes=_max_memory(self.device),
            **(self.state_bytes or {}),
            **(self.router_stats.summary() if self.router_stats else {}),
        )
        if self.metrics is not None:
            self.metrics.log(record)

    def count_nonfinite(self, nonfinite: bool, loss: float, grad_norm: float) -> None:
        """Say a skipped step; raise NonFiniteState when the run must stop (train.nonfinite)."""
        if not nonfinite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.say(f"step {self.step}: non-finite loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}): update skipped, "
                 f"weights and optimizer state unchanged ({self.nonfinite_streak} in a row)")
        limit = self.job.train.max_nonfinite_steps
        if self.job.train.nonfinite == "stop" or self.nonfinite_streak > limit:
            why = "train.nonfinite=stop" if self.job.train.nonfinite == "stop" else f"more than train.max_nonfinite_steps={limit} in a row"
            raise NonFiniteState(f"non-finite loss or gradients at step {self.step} ({why}); the newest complete checkpoint is step {self.saved_step}")

    def stop_on_request(self, flags: list[int]) -> int:
        """The ranks agreed to stop: save (unless this step is saved), say where, return the status."""
        path = self.save() if self.saved_step != self.step else self.run_dir / "checkpoints" / checkpoint_name(self.step)
        self.checkpointer.close()
        status = stop.exit_status(flags)
        requeue = " (exit 75: requeue the job to continue)" if status == stop.EXIT_REQUEUE else ""
        self.say(f"distrain: stopped by {stop.name(flags)} after step {self.step}; checkpoint {path}; "
                 f"to resume, run the same command with run.dir={self.run_dir}{requeue}")
        return status


class NonFiniteState(RuntimeError):
    """The run must stop: its state is not finite (or kept being so)."""


def _poison(model: torch.nn.Module) -> None:
    """The `nan@weights` fault: a non-finite weight, as an overflowing update would leave."""
    with torch.no_grad():
        _local(next(model.parameters())).view(-1)[0] = float("nan")


def _param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """One group per mesh (foreach kernels cannot mix plain tensors and DTensors, or meshes) and
    per weight decay (norms and biases apart)."""
    groups: dict[object, list] = {}
    for name, param in model.named_parameters():
        key = (param.device_mesh if isinstance(param, DTensor) else None, _decayed(name, param, optim))
        groups.setdefault(key, []).append(param)
    return [{"params": params, **_hyperparameters(decayed, optim)} for (_, decayed), params in groups.items()]


def _decayed(name: str, param: torch.Tensor, optim: OptimConfig) -> bool:
    """Weight decay applies to matrices (and embeddings), not to 1-D parameters (norm gains, biases,
    GPT-OSS's attention sinks; a DTensor's ndim is its global one) nor to biases stacked per expert
    (GPT-OSS's [E, N] ones), unless optim.decay_norms_and_biases."""
    return optim.decay_norms_and_biases or (param.ndim >= 2 and not name.endswith("bias"))


def _hyperparameters(decayed: bool, optim: OptimConfig) -> dict:
    """The config's AdamW hyperparameters for a group (a resume applies them over a checkpoint's)."""
    return {"initial_lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps, "weight_decay": optim.weight_decay if decayed else 0.0}


def _local_bytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _local(value: torch.Tensor) -> torch.Tensor:
    """A parameter's or gradient's local shard (a plain tensor is its own)."""
    return value.to_local() if isinstance(value, DTensor) else value


def _max_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
