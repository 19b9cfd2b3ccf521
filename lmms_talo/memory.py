"""Process memory, recorded after every sub-task so a long run shows whether memory stays flat.

A sub-task must leave nothing behind (records, hooks, prefix-replay caches): the report's
per-sub-task `memory` entries make growth visible, and `benchmarks/memory_flat.py` measures it.
"""

from __future__ import annotations

import os
import resource
import sys

import torch


def _resident_mb() -> float | None:
    """Current resident set size (Linux /proc); None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_memory() -> dict:
    """Resident and peak memory of this process in MiB, and the accelerator's when one is in use."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak_kb / 2**20 if sys.platform == "darwin" else peak_kb / 2**10  # bytes on macOS
    resident = _resident_mb()
    # the kernel folds the current size into ru_maxrss lazily: the peak is at least what is resident now
    memory = {"rss_mb": resident, "peak_rss_mb": max(peak, resident or 0.0)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
