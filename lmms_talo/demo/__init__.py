"""lmms-talo demo."""
