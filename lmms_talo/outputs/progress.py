"""What the probe pre-pass will cost, said before it starts, and a progress bar while it runs.

One line before the sweep: the sub-tasks to probe, the variants each, and the probe passes of their
first rounds (later rounds, the multi-layer search and the test docs come on top); after the first
pass, its measured time and what round 0 of every sub-task then costs. The bar counts probe passes
(variant x doc) with an ETA, on the main rank only, and only on a terminal unless the harness's
--verbosity is DEBUG.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from lmms_talo.logs import log


class ProbeProgress:
    def __init__(self, label: str, planned: int, enabled: bool):
        self.label = label
        self.planned = planned
        self.passes = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=planned, desc=f"TaLo probe passes ({label})", unit="pass", file=sys.stderr)

    @classmethod
    def start(
        cls, label: str, subtasks: int, unprobed: int, variants: int, planned: int, *, main: bool, verbose: bool
    ) -> ProbeProgress:
        if main and subtasks:
            log.info(
                f"TaLo ({label}): {subtasks} sub-task(s) to probe ({unprobed} not probed), {variants} variants each "
                f"(the base model and every candidate layer): round 0 alone is up to {planned} probe passes; redraws, "
                f"the multi-layer search and the test docs come on top"
            )
        return cls(label, planned, enabled=main and subtasks > 0 and (sys.stderr.isatty() or verbose))

    @contextlib.contextmanager
    def timed(self, passes: int = 1) -> Iterator[None]:
        """One harness call of the sweep: `passes` (variant, doc) pairs."""
        started = time.perf_counter()
        yield
        self.done((time.perf_counter() - started) / passes, passes)

    def done(self, seconds: float, passes: int = 1) -> None:
        """`passes` more passes, `seconds` each."""
        self.passes += passes
        if self.passes == passes:
            log.info(
                f"TaLo ({self.label}): one probe pass took {seconds:.2f} s: round 0 of every sub-task needs about "
                f"{seconds * self.planned / 60:.1f} min"
            )
        if self.bar is not None:
            self.bar.total = max(self.bar.total, self.passes)
            self.bar.update(passes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
