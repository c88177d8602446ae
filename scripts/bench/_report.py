"""Shared by the benchmarks: print a table and write it as JSON under a results folder."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def report(name: str, rows: list[dict], out_dir: str, notes: dict | None = None) -> Path:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row[c]).ljust(widths[c]) for c in columns))
    out = Path(out_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"host": platform.node(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out.write_text(json.dumps({"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine,
                               "notes": notes or {}, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
