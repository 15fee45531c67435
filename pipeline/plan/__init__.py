"""params.yaml typed, the composition of a run's config, the ablation's runs, plan files and run keys."""
