"""The lmms-eval side of lmms-talo: entry-point manifests, the harness object, repairs of lmms-eval's
base classes and the named models over the (harness-neutral) TaLo mixin."""
