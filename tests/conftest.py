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
