"""Functions the test ranks (tests/ranks.py) run on every rank of a job, each setting up and
tearing down its own process group."""

from __future__ import annotations


def count_step(recipe: str, overrides: list[str]) -> dict:
    """One warm-up step, then one counted step: each collective kind's bus bytes and calls, and
    the calls of the expensive MoE ops (grouped GEMMs, forward and backward)."""
    from conftest import OpCounter
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    from distrain.metrics.comm import CommCounter

    with trainer_in_own_group(recipe, overrides) as trainer:
        trainer.train_step(trainer.train_loader.next_batch())
        comm, ops = CommCounter(), OpCounter()
        with comm, ops:
            trainer.train_step(trainer.train_loader.next_batch())
        return {"bus": dict(comm.bus), "collectives": dict(comm.calls), "grouped_mm": ops.calls["aten._grouped_mm"]}


def asynchronous_collectives(recipe: str, overrides: list[str]) -> int:
    """Two training steps: how many collectives went through torch's asynchronous functional
    collectives (the ones DTensor's redistribute issues, wrapped in `AsyncCollectiveTensor`)."""
    import torch.distributed._functional_collectives as funcol
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    wrap, calls = funcol._maybe_wrap_tensor, [0]

    def counted(tensor):
        calls[0] += 1
        return wrap(tensor)

    funcol._maybe_wrap_tensor = counted
    try:
        with trainer_in_own_group(recipe, overrides) as trainer:
            for _ in range(2):
                trainer.train_step(trainer.train_loader.next_batch())
    finally:
        funcol._maybe_wrap_tensor = wrap
    return calls[0]


def all_to_all_windows(recipe: str, overrides: list[str]) -> dict:
    """One warm-up step, then one recorded step: for each all-to-all of rows (started, then waited
    on), the matmuls (dense or grouped) dispatched while it was in flight, in forward and in
    backward, in the order the all-to-alls were waited on."""
    import torch
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = torch.ops._c10d_functional

    class Windows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.open, self.closed = {}, {"forward": [], "backward": []}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is ops.all_to_all_single.default and args[0].is_floating_point():
                phase = "forward" if torch._C._current_graph_task_id() == -1 else "backward"
                self.open[id(out)] = (out, phase, [0])
            elif func is ops.wait_tensor.default and id(args[0]) in self.open:
                _, phase, matmuls = self.open.pop(id(args[0]))
                self.closed[phase].append(matmuls[0])
            elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._grouped_mm.default):
                for _, _, matmuls in self.open.values():
                    matmuls[0] += 1
            return out

    with trainer_in_own_group(recipe, overrides) as trainer:
        trainer.train_step(trainer.train_loader.next_batch())
        with Windows() as windows:
            trainer.train_step(trainer.train_loader.next_batch())
        return windows.closed


def import_memory(recipe: str, overrides: list[str]) -> dict:
    """A Trainer built from a pretrained model (the weights imported on every rank): how far the
    rank's resident memory rose above its level before, by the end of the import (its own
    counters: /proc/self/clear_refs resets the peak, VmHWM reads it), with the modeling code
    imported before the baseline."""
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    from distrain.config import load_job
    from distrain.models import build_config, meta_model

    meta_model(build_config(load_job(recipe, overrides).model))

    def status(field: str) -> int:
        return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

    import distrain.train.trainer as trainer_module

    load_sharded, peaks = trainer_module.load_sharded, []

    def measured(model, keys):  # the peak up to the end of the import (the optimizer's state comes after)
        load_sharded(model, keys)
        peaks.append(status("VmHWM"))

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident size starts again from now
    before = status("VmRSS")
    trainer_module.load_sharded = measured
    try:
        with trainer_in_own_group(recipe, overrides) as trainer:
            shard_bytes = sum(p.to_local().numel() * 4 if hasattr(p, "to_local") else p.numel() * 4 for p in trainer.model.parameters())
    finally:
        trainer_module.load_sharded = load_sharded
    return {"grown": peaks[0] - before, "shard_bytes": shard_bytes}


def expert_reads(recipe: str, overrides: list[str]) -> list[int]:
    """A Trainer built from a pretrained model: the experts whose checkpoint tensors this rank read."""
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path

    from distrain.checkpoint.hf_import import _Reader

    whole, read = _Reader.whole, set()

    def counted(self, key):
        read.add(key)
        return whole(self, key)

    _Reader.whole = counted
    try:
        with trainer_in_own_group(recipe, overrides):
            pass
    finally:
        _Reader.whole = whole
    return sorted({int(key.split(".experts.")[1].split(".")[0]) for key in read if ".experts." in key})


def unsharded_when_the_last_block_runs(recipe: str, overrides: list[str]) -> list[str]:
    """One training step: the 2-D parameters of the blocks before the last that FSDP holds
    unsharded when the last block's forward begins (each is resharded after its block's forward
    unless something keeps it whole), routers aside (small: kept whole by design)."""
    from layouts import trainer_in_own_group  # scripts/bench, on the ranks' path
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    held = set()
    with trainer_in_own_group(recipe, overrides) as trainer:
        model, blocks = trainer.model, trainer.spec.blocks
        names = {module: name for name, module in model.named_modules()}
        earlier = tuple(f"{names[block]}." for block in blocks[:-1])
        routers = {m for moe in trainer.spec.moe_blocks for m in (moe.router, moe.shared_gate) if m is not None}

        def record(module, args):
            for unit in model.modules():
                group = unit._get_fsdp_state()._fsdp_param_group if isinstance(unit, FSDPModule) else None
                for param in group.fsdp_params if group else ():
                    name = f"{names[param._module_info.module]}.{param._module_info.param_name}"
                    router = param._module_info.module in routers
                    if param.sharded_state == ShardedState.UNSHARDED and len(param._orig_size) >= 2 and name.startswith(earlier) and not router:
                        held.add(name)

        handle = blocks[-1].register_forward_pre_hook(record)
        trainer.train_step(trainer.train_loader.next_batch())
        handle.remove()
    return sorted(held)


def abort_on(rank: int, once: str | None = None) -> None:
    """Rank `rank` dies as a native crash does (SIGABRT), without answering; the others return.
    With `once` (a file path), only while that file does not exist: the first try creates it."""
    import os

    if int(os.environ.get("RANK", 0)) == rank and not (once and os.path.exists(once)):
        if once:
            open(once, "w").close()
        os.abort()
