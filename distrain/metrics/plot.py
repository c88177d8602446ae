"""`distrain plot RUN_DIR [RUN_DIR ...]`: PNG plots of runs' metrics.jsonl, several runs overlaid.

Written into the first run directory (`plots/`):
- `curves.png`: loss and eval loss, learning rate, gradient norm, tokens/s and MFU against step;
- `router_load_<run>.png` (MoE runs): each layer's max/mean expert load per step as a heatmap
  (1.0 is perfectly balanced), one per run.
Skipped (non-finite) steps are gaps, not zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

from distrain.config import ConfigError

PANELS = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU")]


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; pass a run directory (run.dir) of a run that logged steps")
    records = []
    with open(path) as handle:  # line by line, without the per-expert counts: a week of MoE records is GBs
        for line in handle:
            if line.strip():
                record = json.loads(line)
                record.pop("moe_tokens_per_expert", None)
                records.append(record)
    if not records:
        raise ConfigError(f"{path} is empty: the run has not logged a step yet")
    return records


def plot_runs(run_dirs: list[Path]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = {_label(run_dir, run_dirs): read_records(run_dir) for run_dir in run_dirs}
    out_dir = run_dirs[0] / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.flatten()
    for ax, (key, title) in zip(axes, PANELS):
        for label, records in runs.items():
            steps, values = _series(records, key)
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=label, linewidth=1)
            if key == "loss":
                eval_steps, eval_values = _series([r for r in records if "eval_loss" in r], "eval_loss")
                if eval_steps:
                    ax.plot(eval_steps, [float("nan") if v is None else v for v in eval_values], "o--", label=f"{label} eval", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        values = [v for r in runs.values() for v in _series(r, key)[1] if v is not None]
        if key in ("loss", "grad_norm") and values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # spans of more than 10x
        if ax.lines:
            ax.legend(fontsize=8)
    axes[-1].axis("off")
    figure.tight_layout()
    written.append(out_dir / "curves.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    for label, records in runs.items():
        loads = [(r["step"], r["moe_max_mean_load"]) for r in records if r.get("moe_max_mean_load")]
        if not loads:
            continue
        figure, ax = plt.subplots(figsize=(10, 4))
        grid = [[float("nan") if v is None else v for v in layers] for _, layers in loads]
        image = ax.imshow(list(map(list, zip(*grid))), aspect="auto", cmap="viridis", origin="lower",
                          extent=(loads[0][0] - 0.5, loads[-1][0] + 0.5, -0.5, len(grid[0]) - 0.5))
        figure.colorbar(image, ax=ax, label="max / mean expert load")
        ax.set_xlabel("step")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"router load per layer: {label}")
        figure.tight_layout()
        written.append(out_dir / f"router_load_{label.replace('/', '_')}.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written


def _series(records: list[dict], key: str) -> tuple[list[int], list]:
    chosen = [r for r in records if key in r]
    return [r["step"] for r in chosen], [r[key] for r in chosen]


def _label(run_dir: Path, run_dirs: list[Path]) -> str:
    names = [d.resolve().name for d in run_dirs]
    name = run_dir.resolve().name
    return name if names.count(name) == 1 else str(run_dir)
