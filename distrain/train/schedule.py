"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (wsd) or constant.

Each maps a step to a multiplier of `optim.lr`, so `LambdaLR` holds no state beyond the step.
"""

from __future__ import annotations

import math

from distrain.config.schema import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier for the update at `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: flat at 1 until the last decay_ratio of the steps, then linear down to the floor
    decay_steps = max(1, round(cfg.decay_ratio * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1 - floor) * progress
