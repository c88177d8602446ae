"""Processes of a job on this machine (Linux /proc): the launcher forwards signals to its workers,
and the `kill@...` test faults kill a whole job, by way of these."""

from __future__ import annotations

import os


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry))
    return pids
