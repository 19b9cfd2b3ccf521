"""`lmms-talo lm-eval <lm-eval args>`: lm-eval's own CLI with the `talo_hf` model registered."""

from __future__ import annotations

import sys

HELP = "run lm-evaluation-harness with TaLo's talo_hf model registered (all arguments go to lm-eval)"
PASSTHROUGH = True


def output_path(argv: list[str]) -> str | None:
    """The value of lm-eval's --output_path / -o, where the TaLo report goes too."""
    for index, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def run(argv: list[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    from lmms_talo.harness.lm_eval import lm_eval_harness
    from lmms_talo.harness.lm_eval.model import register

    register()
    lm_eval_harness.set_output_path(output_path(argv))
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse and lm-eval exit through SystemExit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
