"""MLflow: the store, and the logging of an ablation."""
