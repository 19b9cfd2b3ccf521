"""lmms-talo lm_eval."""
