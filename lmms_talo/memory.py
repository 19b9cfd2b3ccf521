"""Process memory, recorded after every sub-task so a long run shows whether memory stays flat.

A sub-task must leave nothing behind (records, hooks, prefix-replay caches): the report's
per-sub-task `memory` entries make growth visible, and `benchmarks/memory_flat.py` measures it.
"""

from __future__ import annotations

import resource
import sys

import torch


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB; None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_resident_mb() -> float:
    """This process's own peak resident memory in MiB.

    Linux's `ru_maxrss` carries the parent's peak into a child across fork and exec, so a harness
    started by a large process (the demo's driver, which builds the model first) would report the
    parent's peak; the high-water mark of the process's own address space (`VmHWM`) starts afresh
    at exec. `ru_maxrss` remains the answer where /proc is missing (macOS: bytes, not kB)."""
    own = _status_mb("VmHWM")
    if own is not None:
        return own
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def process_memory() -> dict:
    """Resident and peak memory of this process in MiB, and the accelerator's when one is in use."""
    memory = {"rss_mb": _status_mb("VmRSS"), "peak_rss_mb": peak_resident_mb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
