"""Shared fixtures (tiny models built once per session, lmms-talo's log in caplog) and the test loops.

Markers (registered in pyproject.toml, [tool.pytest.ini_options]):

- ``slow``: runs a real pretrained model (minutes; test_demo_slow.py).
- ``e2e``: end to end: starts the real lmms-eval, lm-eval or lmms-talo command line in a subprocess
  (or ``accelerate launch``, or benchmarks/gpu_check.sh), or takes more than ~5 s on a 2-core machine
  (whole in-process lmms-eval evaluations of a tiny model, for one). A file that is e2e throughout says
  so once, with ``pytestmark = pytest.mark.e2e``; elsewhere each such test carries ``@pytest.mark.e2e``.

Loops, run from tests/:

- ``pytest -m "not slow and not e2e"``: the unit tests, the fast loop while editing (``make test-fast``;
  about 70 s on 2 cores, measured 2026-12-03).
- ``pytest -m "not slow"``: everything but the real model.
- ``pytest``: every test; what CI runs.

A new test that starts a command line or takes more than ~5 s gets ``@pytest.mark.e2e``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tiny_models import build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Builds each tiny architecture once per session: tiny_model_dir("llava") -> its folder."""
    built: dict[str, pathlib.Path] = {}

    def get(arch: str) -> pathlib.Path:
        if arch not in built:
            built[arch] = build_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
        return built[arch]

    return get


@pytest.fixture(autouse=True)
def talo_log(caplog):
    """lmms-talo's logger does not propagate to the root (lmms_talo.logs): caplog reads it directly."""
    import logging

    logger = logging.getLogger("lmms_talo")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
