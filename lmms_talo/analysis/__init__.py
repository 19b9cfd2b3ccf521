"""lmms-talo analysis."""
