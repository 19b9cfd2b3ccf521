"""Which sweep engine a sub-task runs (lmms_talo.method.batching): batched where the harness's model
class batches requests and the model is not offloaded to disk, else sequential, with the reason."""

from __future__ import annotations

from typing import Any

from lmms_talo.logs import log
from lmms_talo.method.batching import SweepEngine

_SAID: set[str] = set()  # the reasons already logged in this process


def harness_batch_size(lm: Any) -> int:
    """The harness's rows per model call: lmms-eval's and lm-eval's classes keep it in
    batch_size_per_gpu (or batch_size); lm-eval's batch_size=auto finds it at run time, up to max_batch_size."""
    for name in ("batch_size_per_gpu", "batch_size", "max_batch_size"):
        value = getattr(lm, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return 1


def disk_offloaded(model: Any) -> str | None:
    """Why batching cannot apply to this model: accelerate streams disk-offloaded weights per call."""
    placement = getattr(model, "hf_device_map", None) or {}
    if "disk" in {str(device) for device in placement.values()}:
        return "accelerate offloads part of the model to disk"
    return None


def choose_engine(lm: Any, model: Any, group: Any, wanted: bool) -> SweepEngine:
    """The sub-task's engine; sweep=select runs chunks of as many probe units (a doc, or all rows of
    one question) as fill one batch."""
    batch_size = harness_batch_size(lm)
    per_unit = max((len(group.unit_requests([unit])) for unit in group.split.pool_units), default=1)
    engine = SweepEngine.choose(wanted, batch_size, batch_size // max(per_unit, 1), disk_offloaded(model))
    if engine.why not in _SAID:
        _SAID.add(engine.why)
        log.info("lmms-talo: the %s sweep engine: %s", "batched" if engine.batched else "sequential", engine.why)
    return engine
