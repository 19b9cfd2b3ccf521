"""lmms-talo: TaLo (Task-Adaptive Layer Knockout) for lmms-eval and lm-evaluation-harness."""

__version__ = "0.1.0"
