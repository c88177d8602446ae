"""`distrain train|plan|export`: compose and validate the config, then hand over to the launcher.

    distrain train recipe=NAME_OR_PATH [key=value ...] [--cfg job]
    distrain plan  recipe=NAME_OR_PATH [key=value ...]
    distrain plot RUN_DIR [RUN_DIR ...]
    distrain export CHECKPOINT_DIR OUT_DIR [--dtype float32|bfloat16] [--force] [--max-shard-size 5GB] [--push-to-hub REPO_ID]

Exit status: 0 on success; 2 for a configuration error (reported before any worker starts);
3 when the run stopped on non-finite values; 75 when it saved and stopped on SIGUSR1 (requeue
it), 143 / 130 on SIGTERM / SIGINT; 1 (or the failing rank's status) for anything else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from distrain.config import ConfigError

DEFAULT_RECIPE = "qwen3_moe_debug"


def _split_recipe(items: list[str]) -> tuple[str, list[str]]:
    recipe, overrides = DEFAULT_RECIPE, []
    for item in items:
        if item.startswith("recipe="):
            recipe = item.split("=", 1)[1]
        elif "=" not in item:
            raise ConfigError(f"{item!r}: expected key=value (e.g. train.steps=10) or recipe=NAME")
        else:
            overrides.append(item)
    return recipe, overrides


def _load(items: list[str]):
    from distrain.config import load_job

    recipe, overrides = _split_recipe(items)
    return load_job(recipe, overrides)


def _on_cuda(job) -> bool:
    """Whether the run's ranks will be on CUDA (`run.device`, auto: when a GPU is visible)."""
    import torch

    return job.run.device == "cuda" or (job.run.device == "auto" and torch.cuda.is_available())


def _check_device(job) -> None:
    import torch

    if job.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda: no CUDA device is visible here (check CUDA_VISIBLE_DEVICES and the driver); use run.device=cpu or auto")
    if job.launcher.backend == "nccl" and not _on_cuda(job):
        raise ConfigError("launcher.backend=nccl needs CUDA GPUs and this run is on the CPU (run.device); use launcher.backend=gloo or auto")
    from distrain.launch import ranks_on_this_node, under_launcher

    here, visible = ranks_on_this_node(job), torch.cuda.device_count() if _on_cuda(job) else 0
    # NOTE: a launcher that binds each task to its own GPU (srun --gpus-per-task=1) shows it one
    if here is not None and 1 < visible < here:
        what = "launcher.nproc_per_node" if not under_launcher() else "the launcher's ranks on this node"
        raise ConfigError(f"{what}={here} but this machine shows {visible} CUDA GPUs (one rank each); "
                          f"run {visible} ranks per node (launcher.nproc_per_node={visible}), or check CUDA_VISIBLE_DEVICES")


def _warn(job, dims) -> None:
    """Allowed, but worth a line (after every check passed: an error stays the only line), from
    rank 0 alone where a launcher started every rank's CLI."""
    if os.environ.get("RANK", "0") != "0":
        return
    samples = job.eval.batches * job.train.micro_batch_size
    if job.eval.interval and samples < dims.dp:
        print(f"warning: eval.batches x train.micro_batch_size = {samples} held-out sample(s) for {dims.dp} data-parallel ranks: "
              f"{dims.dp - samples} rank(s) evaluate nothing; eval.batches={-(-dims.dp // job.train.micro_batch_size)} or more "
              "gives each one sample", file=sys.stderr)
    from distrain.launch import ranks_on_this_node, under_launcher

    here = ranks_on_this_node(job)
    if under_launcher() and job.launcher.nproc_per_node > 1 and here not in (None, job.launcher.nproc_per_node):
        print(f"warning: launcher.nproc_per_node={job.launcher.nproc_per_node}, but the launcher (torchrun, srun) runs {here} rank(s) on "
              "this node, and its layout is the one used; start as many as the recipe expects (srun --ntasks-per-node, torchrun "
              "--nproc-per-node) or set launcher.nproc_per_node to match", file=sys.stderr)
    if job.optim.warmup_steps > job.train.steps:
        print(f"warning: optim.warmup_steps={job.optim.warmup_steps} is more than train.steps={job.train.steps}: "
              "the learning rate never reaches optim.lr in this run", file=sys.stderr)
    if job.profile.steps and job.profile.steps[0] > job.train.steps:
        print(f"warning: profile.steps={job.profile.steps} starts after train.steps={job.train.steps}: no trace is written", file=sys.stderr)


def _validate_layout(job):
    """Check the mesh against the model before any worker exists; returns (dims, hf_config, the
    model on the meta device)."""
    from distrain.launch import world_size_for
    from distrain.models import build_config
    from distrain.parallel.mesh import ParallelDims

    hf_config = build_config(job.model)
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and job.train.seq_len > max_positions:
        raise ConfigError(f"train.seq_len={job.train.seq_len} is longer than the model's max_position_embeddings={max_positions}; "
                          f"use train.seq_len<={max_positions} (or raise model.config.max_position_embeddings where the model's "
                          "positions extrapolate)")
    dims = ParallelDims.resolve(job.parallel, world_size_for(job), hf_config, job.train)
    if dims.cpu_offload and not _on_cuda(job):
        raise ConfigError(
            "parallel.cpu_offload=true keeps parameters and optimizer states in host memory between uses on a GPU; "
            "this run is on the CPU already (run.device), so there is nothing to offload; use parallel.cpu_offload=false"
        )
    from distrain.models import build_meta_model

    model, spec = build_meta_model(job.model, hf_config)  # on meta: no memory; model errors surface here
    dims.check_experts(spec.num_experts)
    if spec.moe_blocks:
        from distrain.moe.experts import resolve_kernel

        resolve_kernel(job.moe.kernel, "cuda" if _on_cuda(job) else "cpu")
    if dims.tp > 1:
        from distrain.parallel.tensor_parallel import resolved_plan

        resolved_plan(model, spec, dims.tp, moe_outside=dims.ep > 1)
    if job.moe.bias_update_rate and not any(hasattr(b.router, "e_score_correction_bias") for b in spec.moe_blocks):
        raise ConfigError(
            f"moe.bias_update_rate={job.moe.bias_update_rate}: {type(model).__name__}'s routers carry no e_score_correction_bias "
            "to update (auxiliary-loss-free balancing is DeepSeek-V3's); use moe.bias_update_rate=null or moe.aux_loss_coef"
        )
    return dims, hf_config, model


def _check_weights(model_cfg, meta) -> None:
    """Pretrained safetensors (a hub model's downloaded into the hub cache here, before any worker
    starts, so no rank waits for a download inside a collective) must hold every tensor of the model."""
    from distrain.models import has_pretrained_weights

    if not has_pretrained_weights(model_cfg):
        return
    from distrain.checkpoint.hf_import import check_keys, safetensors_folder

    try:
        folder = safetensors_folder(model_cfg.name_or_path)
    except Exception as error:  # noqa: BLE001 - network, token, a missing repo: the user's to fix
        raise ConfigError(f"model.name_or_path={model_cfg.name_or_path}: could not fetch its weights from the hub "
                          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); check the id and the network") from None
    if folder is not None:  # safetensors (else .bin, loaded whole by from_pretrained)
        check_keys(meta, folder)


def _validate_run(job, hf_config, meta) -> None:
    """Data, run directory and resume, before any worker starts: the tokenized cache is built
    here (no rank waits for it inside a collective), and its vocabulary must fit the model."""
    import os

    from distrain.data.corpus import prepare_corpus
    from distrain.launch import under_launcher
    from distrain.launch.run_dir import check_run

    _, fingerprint, vocab_size = prepare_corpus(job.data)
    _check_weights(job.model, meta)
    if vocab_size > hf_config.vocab_size:
        raise ConfigError(
            f"model.config.vocab_size={hf_config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"set model.config.vocab_size>={vocab_size} (or use a tokenizer with fewer)"
        )
    # NOTE: ranks started in-process (torchrun, srun) each composed a config; rank 0's is the
    #       run's (distrain.launch.worker.agree), so only rank 0 checks the directory it names
    if not under_launcher() or os.environ["RANK"] == "0":
        check_run(job, fingerprint, lock=True)
        if job.checkpoint.export:  # found at the end of the run, it would fail a finished run
            from distrain.checkpoint.export import check_export_target

            check_export_target(Path(job.run.dir) / "export", force=True)


def validate_train(job) -> None:
    """Everything `distrain train` checks before any worker starts (the in-process test ranks
    check the same)."""
    _check_device(job)
    dims, hf_config, meta = _validate_layout(job)
    _check_document_masking(job, hf_config)
    _validate_run(job, hf_config, meta)
    _warn(job, dims)


def _check_document_masking(job, hf_config) -> None:
    """Packed documents must not attend to each other (data.document_masking): the model's own
    forward, at toy size, must isolate them given restarting position ids."""
    if not job.data.document_masking:
        return
    from distrain.models import document_leak

    name = type(hf_config).__name__.removesuffix("Config")
    try:
        leak = document_leak(hf_config)
    except Exception as error:  # noqa: BLE001 - a model the toy-size copy cannot build: say so, go on
        print(f"warning: could not check that {name} isolates the documents packed into a sample ({type(error).__name__}: "
              f"{str(error).splitlines()[0][:200]}); set data.document_masking=false if it does not", file=sys.stderr)
        return
    if leak > 1e-4:
        raise ConfigError(
            f"data.document_masking=true: {name} (model.attn_implementation={hf_config._attn_implementation}) does not isolate "
            f"the documents packed into a sample: given position ids that restart at each document, its logits differ from each "
            f"document's alone by {leak:.1e}; use data.document_masking=false to train on samples that attend across documents"
        )


def cmd_train(args) -> int:
    from distrain.launch import adopt_slurm_env
    from distrain.train import stop

    # NOTE: a scheduler's stop request (SIGTERM, SIGUSR1) during the set-up below (the tokenized
    #       cache may take long to build) must not kill the task with no status the batch script
    #       understands; Ctrl-C (SIGINT) still interrupts the set-up at once
    stop.install((signal.SIGTERM, signal.SIGUSR1))
    adopt_slurm_env()
    job = _load(args.overrides)
    if args.cfg == "job":
        import yaml

        from distrain.config import to_dict

        print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
        return 0
    validate_train(job)
    if any(stop.received()):
        print(f"distrain: stopped by {stop.name(stop.received())} before training started; nothing to save", flush=True)
        return stop.exit_status(stop.received())
    from distrain.launch import launch

    return launch(job)


def cmd_plan(args) -> int:
    from distrain.parallel.plan import describe_plan

    job = _load(args.overrides)
    dims, hf_config, _ = _validate_layout(job)
    _warn(job, dims)
    text, _ = describe_plan(job, dims, hf_config, args.device_memory_gib * 2**30 if args.device_memory_gib else None)
    print(text)
    return 0


def cmd_export(args) -> int:
    import torch

    from distrain.checkpoint.export import export_checkpoint

    out = export_checkpoint(args.checkpoint_dir, args.out_dir, dtype=getattr(torch, args.dtype), force=args.force, max_shard_size=args.max_shard_size)
    print(f"exported {args.checkpoint_dir} to {out}")
    if args.push_to_hub:
        from distrain.checkpoint.export import push_to_hub

        print(f"uploaded to {push_to_hub(out, args.push_to_hub)}")
    return 0


def cmd_plot(args) -> int:
    from distrain.metrics.plot import plot_runs

    for path in plot_runs([Path(d) for d in args.run_dirs]):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrain", description="Distributed trainer for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train: distrain train recipe=NAME [key=value ...]")
    train.add_argument("overrides", nargs="*", help="recipe=NAME_OR_YAML and key=value overrides")
    train.add_argument("--cfg", choices=["job"], help="print the resolved config and exit")
    train.set_defaults(func=cmd_train)
    plan = sub.add_parser("plan", help="validate the layout and print per-rank memory, without training")
    plan.add_argument("--device-memory-gib", type=float, help="device memory to set the totals against (default: detected)")
    plan.add_argument("overrides", nargs="*")
    plan.set_defaults(func=cmd_plan)
    export = sub.add_parser("export", help="checkpoint -> from_pretrained-loadable safetensors folder")
    export.add_argument("checkpoint_dir")
    export.add_argument("out_dir")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a previous export (nothing else)")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this hub model repo (network and token needed)")
    export.set_defaults(func=cmd_export)
    plot = sub.add_parser("plot", help="PNG plots of runs' metrics (loss, eval loss, lr, grad norm, tokens/s, MFU, router load)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except ConfigError as error:
        print(f"distrain: config error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the run's own handlers exist (config, data preparation)
        print("distrain: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    main()
