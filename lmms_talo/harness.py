"""What differs between the harnesses TaLo runs in, behind one small object per harness.

The TaLo mixin (lmms_talo.mixin) is harness-neutral. Each TaLo model class names its harness in
`talo_harness`, and the mixin asks it only for what lmms-eval and lm-eval do differently:
  install()        scope every `evaluate()` call of the harness (lmms_talo.evaluation_scope): its
                   Task objects, CLI args and probe splits, and any repair the harness needs
  unwrap(output)   one raw answer of the base class, as the Task's filters and process_results take it
  request(...)     another rank's request rebuilt as this harness's Instance (lmms_talo.parallel)
  model_packages   where the harness's model classes log the failures they swallow
The two live in lmms_talo.lmms.harness and lmms_talo.lm_eval.harness; neither imports the other's
harness, so the lm-eval path runs where lmms-eval is not installed.
"""

from __future__ import annotations

from typing import Any, Sequence


class Harness:
    name: str = ""  # the distribution, as the report names it: "lmms-eval" or "lm-eval"
    model_packages: tuple[str, ...] = ()

    def install(self) -> None:
        raise NotImplementedError

    def unwrap(self, output: Any) -> Any:
        return output

    def request(self, task: Any, request_type: str, arguments: Sequence[Any], idx: int, metadata: Any) -> Any:
        raise NotImplementedError
