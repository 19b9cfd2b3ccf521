"""The harness side: the TaLo mixin over a harness's model class, request grouping, scoring, and the
lmms-eval (lmms/) and lm-eval (lm_eval/) adapters."""
