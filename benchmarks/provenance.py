"""What every benchmark result file records about the run that produced it: the date, the commit,
the CPU and thread count, the load average, and the library versions."""

from __future__ import annotations

import datetime
import os
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("lmms-talo", "torch", "transformers", "lmms-eval", "lm-eval", "numpy")


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    from lmms_talo.outputs.model_identity import cpu_model

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "versions": versions,
    }
