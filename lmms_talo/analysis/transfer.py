"""Cross-task transfer: the knockout selected on sub-task A applied to sub-task B, as B's test gain.

Needs B's test scores under A's selection: a run with `transfer=true` (or `test_all_layers=true`)
records them in `test_variants`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmms_talo.outputs.report_reader import Run


@dataclass
class TransferMatrix:
    sources: list[str]  # sub-tasks that selected a knockout
    source_labels: list[str]  # the knockout each selected ('7', '3+7')
    targets: list[str]
    gains: np.ndarray  # sources x targets; NaN where the run did not score that pair
    unselected: list[str]  # sub-tasks that kept the full model (their row would be all zeros)

    @property
    def complete(self) -> bool:
        return bool(self.gains.size) and not np.isnan(self.gains).any()


def transfer_matrix(run: Run) -> TransferMatrix:
    subs = run.subtasks
    sources = [s for s in subs if s.selected_label != "base"]
    gains = np.full((len(sources), len(subs)), np.nan)
    for i, source in enumerate(sources):
        for j, target in enumerate(subs):
            gain = target.test_gain(source.selected_label)
            if gain is not None:
                gains[i, j] = gain
    return TransferMatrix(
        [s.name for s in sources],
        [s.selected_label for s in sources],
        [s.name for s in subs],
        gains,
        [s.name for s in subs if s.selected_label == "base"],
    )
