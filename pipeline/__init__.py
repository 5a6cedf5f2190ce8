"""ConfidNet failure prediction as a reproducible pipeline.

Library for the DVC stages in ``stages/``: datasets, models, losses, scoring
functions (baselines), metrics and MLflow tracking. Every module is usable on its
own; side effects (files, MLflow) happen only in ``stages/`` and ``pipeline.tracking``.

Reference: Corbière et al., "Addressing Failure Prediction by Learning Model
Confidence", NeurIPS 2019.
"""
