"""Subcommands of `lmms-talo`, discovered by module: see lmms_talo.cli."""
