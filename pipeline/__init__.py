"""ConfidNet failure prediction as a reproducible pipeline.

Library for the DVC stages in ``stages/``: datasets, models, losses, scoring
functions (baselines), metrics and MLflow tracking. Every module is usable on its own.
Importing a module has no side effect; the functions that write files (the dataset
``prepare`` functions, ``pipeline.io``, ``pipeline.checkpoint``, the report's figures)
write only where their caller says, and MLflow is touched only by ``pipeline.tracking``
and ``pipeline.replay``.

Reference: Corbière et al., "Addressing Failure Prediction by Learning Model
Confidence", NeurIPS 2019.
"""
