"""Offline analysis of TaLo reports (`lmms-talo analyze`): everything is recomputed from the per-doc
records in talo_report.json, never from the model.

runs             reading reports; per-sub-task access to gains, test scores and rule decisions
tables           the paper-style results table
clustering       interaction-vector correlation, hierarchical clusters, bootstrap stability (ARI)
agreement        interventions compared over all task-layer pairs; probe gain vs test gain
robustness       the selection redone on bootstrap resamples of the probe docs
transfer         the layer selected on one sub-task applied to another
rule_comparison  each selection rule's choice and its effect on the test docs
figures          the PNG figures
document         Markdown and self-contained HTML from one list of blocks
build            the whole report
"""
