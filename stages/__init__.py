"""One module per DVC stage: ``python -m stages.<name>``. Each is a thin entry point over
``pipeline``: validate params, do the work, write outputs atomically, log to MLflow."""
