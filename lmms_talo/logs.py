"""lmms-talo's one logger: stdlib `logging`, named "lmms_talo", at INFO, printed to stderr.

It does not propagate to the root logger: the harnesses' dependencies install root handlers that drop
INFO (absl's, lm-eval's own set-up), and the pre-pass lines and the summary table must always be
seen, once. Tests read it through their own handler (tests/conftest.py: `talo_log`).
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("lmms_talo")
if not log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(
        logging.Formatter("%(asctime)s | %(levelname)-8s | lmms_talo - %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
