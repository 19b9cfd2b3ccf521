"""The lmms-eval side of lmms-talo: entry-point manifests, the TaLo mixin and the named models."""
