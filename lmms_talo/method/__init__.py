"""The method: probe split, the layer sweep and its fast engines, interventions, selection rules and statistics.

Nothing here imports the harness side (lmms_talo.harness) or the outputs (lmms_talo.outputs).
"""
