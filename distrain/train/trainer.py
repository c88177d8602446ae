"""distrain's training loop: plain Python, built top to bottom in the order things exist.

Loss normalization: every micro-batch's summed cross-entropy is divided by the number of target
tokens in the whole global batch (all micro-batches, all data-parallel ranks), and gradients are
summed over data-parallel ranks. The step's loss is therefore the mean over every target token of
the global batch, whatever the micro-batch size, accumulation count or number of ranks.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from distrain.checkpoint.dcp import latest_checkpoint, load_checkpoint, save_checkpoint
from distrain.checkpoint.export import export_checkpoint
from distrain.config import JobConfig, to_dict
from distrain.data.corpus import load_corpus
from distrain.data.loader import GlobalBatchLoader, eval_batches
from distrain.data.packing import IGNORE_INDEX, PackedDataset
from distrain.metrics.flops import flops_per_token, peak_flops
from distrain.metrics.sinks import MetricsLogger
from distrain.models import build_config, build_meta_model, has_pretrained_weights, pretrained_state_dict
from distrain.parallel.grads import clip_grad_norm
from distrain.parallel.mesh import ParallelDims
from distrain.parallel.tensor_parallel import sync_tp_grads
from distrain.parallel.parallelize import full_random_state, materialize, parallelize
from distrain.train.schedule import lr_multiplier


class Trainer:
    def __init__(self, job: JobConfig, device: torch.device):
        self.job, self.device = job, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(job.run.dir)
        self.bf16 = job.train.mixed_precision == "bf16" or (job.train.mixed_precision == "auto" and device.type == "cuda")

        # mesh
        hf_config = build_config(job.model)
        self.dims = ParallelDims.resolve(job.parallel, self.world_size, hf_config, job.train)
        self.mesh = self.dims.build_mesh(device.type)
        dp_mesh = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.dp_rank, self.dp_size, self.dp_group = dp_mesh.get_local_rank(), dp_mesh.size(), dp_mesh.get_group()

        # data first: the tokenizer decides the vocabulary the model must cover
        corpus = load_corpus(job.data)
        if corpus.train.vocab_size > hf_config.vocab_size:
            raise ValueError(
                f"model.config.vocab_size={hf_config.vocab_size} is smaller than the tokenizer's "
                f"{corpus.train.vocab_size} tokens; set model.config.vocab_size>={corpus.train.vocab_size}"
            )
        self.tokenizer_dir = corpus.tokenizer_dir
        self.train_loader = GlobalBatchLoader(
            PackedDataset(corpus.train, job.train.seq_len),
            job.train.global_batch_size,
            job.train.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            job.run.seed,
        )
        self.eval_set = PackedDataset(corpus.eval, job.train.seq_len)

        # model on meta -> parallelize -> materialize -> weights
        model, self.spec = build_meta_model(job.model, hf_config)
        self.flops_per_token = flops_per_token(model, self.spec, job.train.seq_len)
        self.partial_grads = parallelize(model, self.spec, self.dims, self.mesh, self.bf16)
        self.model = model
        full_state = None
        if self.is_main:
            if has_pretrained_weights(job.model):
                full_state = pretrained_state_dict(job.model, hf_config)
            else:
                full_state = full_random_state(hf_config, job.run.seed)
        materialize(self.model, device, full_state)
        del full_state
        self.model.train()
        # NOTE: one RNG stream per data-parallel rank, the same on its TP ranks: anything random
        #       in a replicated region (router jitter, sampled routing, dropout) must agree there.
        torch.manual_seed(job.run.seed + 1 + self.dp_rank)
        if device.type == "cuda":
            torch.cuda.manual_seed(job.run.seed + 1 + self.dp_rank)

        # optimizer and schedule
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model),
            lr=job.optim.lr,
            betas=(job.optim.beta1, job.optim.beta2),
            eps=job.optim.eps,
            weight_decay=job.optim.weight_decay,
            foreach=True,
        )
        # run directory and checkpoint resume
        self.step = 0
        self.config_path = self.run_dir / "config.yaml"  # written by the launcher
        resume_from = latest_checkpoint(self.run_dir / "checkpoints") if job.checkpoint.resume else None
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer, f"dp_{self.dp_rank}")
            self.step = state["step"]
            self.train_loader.load_state_dict(state["data"])
            if self.is_main:
                print(f"resumed from {resume_from} at step {self.step}", flush=True)
        # NOTE: the learning rate is a function of the step alone; the scheduler is rebuilt at the
        #       resumed step rather than loaded, as its per-group lists follow the layout's groups.
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", job.optim.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, job.train.steps, job.optim), last_epoch=self.step - 1
        )

        self.peak_flops = peak_flops(device, job.logging.peak_flops)
        self.state_bytes = None  # this rank's bytes of parameters, gradients, optimizer states
        self.metrics = MetricsLogger(job, self.run_dir, to_dict(job), self.step) if self.is_main else None

    def autocast(self):
        if self.bf16 and not self.dims.fsdp:  # with FSDP, its mixed-precision policy casts instead
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_context(self):
        # with TP the logits stay sharded on the vocabulary: cross-entropy (and its backward) runs
        # on the shards under loss_parallel
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        with self.loss_context():
            return F.cross_entropy(
                logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(value, group=self.dp_group)
        return value

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        loss = self.forward_backward(micro_batches)
        grad_norm = self.optimizer_step()
        return loss, grad_norm

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        """Accumulate the gradients of one global batch; return its loss (mean per target token)."""
        num_targets = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches).to(self.device, torch.float32)
        scale = 1.0 / self._dp_sum(num_targets).clamp(min=1).item()
        loss_total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            loss = self._loss_sum(mb) * scale
            with self.loss_context():
                loss.backward()
            loss_total += _local(loss.detach())
        if self.dims.tp > 1:
            sync_tp_grads(self.model, self.partial_grads, self.mesh["tp"].get_group())
        return self._dp_sum(loss_total).item()

    def optimizer_step(self) -> float:
        """Clip, update, advance the schedule; return the gradient norm before clipping."""
        max_norm = self.job.train.grad_clip if self.job.train.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model.parameters(), max_norm)
        self.optimizer.step()
        if self.state_bytes is None:
            self.state_bytes = {
                "param_bytes": _local_bytes(self.model.parameters()),
                "grad_bytes": _local_bytes(p.grad for p in self.model.parameters() if p.grad is not None),
                "optimizer_bytes": _local_bytes(v for s in self.optimizer.state.values() for k, v in s.items() if k != "step"),
            }
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        num_samples = self.job.eval.batches * self.job.train.micro_batch_size
        batches = eval_batches(self.eval_set, num_samples, self.job.train.micro_batch_size, self.dp_rank, self.dp_size)
        totals = torch.zeros(2, device=self.device)
        for batch in batches:
            totals[0] += _local(self._loss_sum(batch))
            totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
        self.model.train()
        totals = self._dp_sum(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def save(self) -> Path:
        train_state = {"step": self.step, "data": self.train_loader.state_dict()}
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            train_state,
            self.config_path,
            self.tokenizer_dir,
            self.job.checkpoint.keep,
            rng_name=f"dp_{self.dp_rank}" if self.mesh["tp"].get_local_rank() == 0 else None,
        )

    def train(self) -> None:
        job = self.job
        tokens_per_step = job.train.global_batch_size * job.train.seq_len
        last_checkpoint = None
        # DISTRAIN_FAULT=RANK:STEP makes that rank raise at that step: how the tests check that
        # one failing rank ends the whole job.
        fault = tuple(int(x) for x in os.environ["DISTRAIN_FAULT"].split(":")) if "DISTRAIN_FAULT" in os.environ else None
        while self.step < job.train.steps:
            if fault == (self.rank, self.step + 1):
                raise RuntimeError(f"injected fault (DISTRAIN_FAULT) on rank {self.rank} at step {self.step + 1}")
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            start = time.perf_counter()
            loss, grad_norm = self.train_step(self.train_loader.next_batch())
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - start
            self.step += 1
            record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr}
            if job.eval.interval and (self.step % job.eval.interval == 0 or self.step == job.train.steps):
                record["eval_loss"] = self.evaluate()
            if self.step % job.logging.interval == 0 or self.step == job.train.steps or "eval_loss" in record:
                tokens_per_s = tokens_per_step / step_time
                record.update(
                    tokens_per_s=tokens_per_s,
                    mfu=None if self.peak_flops is None else tokens_per_s / self.world_size * self.flops_per_token / self.peak_flops,
                    step_time_s=step_time,
                    samples_consumed=self.train_loader.position,
                    max_memory_bytes=_max_memory(self.device),
                    **(self.state_bytes or {}),
                )
                if self.metrics is not None:
                    self.metrics.log(record)
            if (job.checkpoint.interval and self.step % job.checkpoint.interval == 0) or self.step == job.train.steps:
                last_checkpoint = self.save()
        if last_checkpoint is None:
            last_checkpoint = latest_checkpoint(self.run_dir / "checkpoints")
        if self.metrics is not None:
            self.metrics.close()
        if job.checkpoint.export and self.is_main and last_checkpoint is not None:
            out = export_checkpoint(last_checkpoint, self.run_dir / "export")
            print(f"exported {last_checkpoint.name} to {out}", flush=True)
        dist.barrier()


def _param_groups(model: torch.nn.Module) -> list[dict]:
    """One group per mesh: foreach kernels cannot mix plain tensors and DTensors, or meshes."""
    groups: dict[object, list] = {}
    for param in model.parameters():
        key = param.device_mesh if isinstance(param, DTensor) else None
        groups.setdefault(key, []).append(param)
    return [{"params": params} for params in groups.values()]


def _local_bytes(tensors) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _local(value: torch.Tensor) -> torch.Tensor:
    """A loss from loss_parallel is a replicated DTensor: every TP rank holds the whole value."""
    return value.to_local() if isinstance(value, DTensor) else value


def _max_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
