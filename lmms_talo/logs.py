"""lmms-talo's one logger: stdlib `logging`, named "lmms_talo", at INFO.

Its records propagate to whatever logging the process configured (lm-eval's, a pipeline's, pytest's
capture). When nothing is configured (lmms-eval logs through loguru, which leaves stdlib logging
bare), they are printed to stderr, so the pre-pass lines and the summary table are always seen, once.
"""

from __future__ import annotations

import logging
import sys


class _StderrWhenUnconfigured(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


log = logging.getLogger("lmms_talo")
if not any(isinstance(h, _StderrWhenUnconfigured) for h in log.handlers):
    _handler = _StderrWhenUnconfigured(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-8s | lmms_talo - %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
