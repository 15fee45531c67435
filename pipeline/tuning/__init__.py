"""Optuna studies over the components' knobs (Balanced L1 α/γ, IoU-balanced sampling K/floor, IoU-balanced η/λ).

- ``space``: the study files (search space, fixed overrides, sampler, pruner), validated;
- ``profiles``: smoke / tiny / coco_1x training budgets;
- ``plan``: study + profile + overrides -> each trial's config;
- ``storage``: sqlite / journal / RDB storages, the workers' lock;
- ``liveness``: trial ownership, failing the trials of dead workers;
- ``training``: what tuning needs of a training (``Trainer``; the Lightning one), and its cost;
- ``objective``: one trial, scored by its mean paired difference to the default over seeds (per-epoch
  reports, pruning), and the default's runs;
- ``validation``: the top trials and the default retrained on fresh seeds, read with the report's statistics;
- ``mlflow_runs``: the study's parent run and nested trial runs;
- ``outputs``: the validated overrides, figures, summary;
- ``runner``: ``run_tuning``, what ``libra tune`` calls.
"""

from pipeline.tuning.runner import TuneOptions, TuningError, run_tuning
from pipeline.tuning.space import StudyError, StudySpec, available_studies, load_study_spec
from pipeline.tuning.storage import StorageError, resolve_storage

__all__ = ["StorageError", "StudyError", "StudySpec", "TuneOptions", "TuningError", "available_studies",
           "load_study_spec", "resolve_storage", "run_tuning"]
