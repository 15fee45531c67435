"""What a run executes: the config schema, data, components, detectors, training and evaluation.

Nothing here imports ``pipeline`` (which plans, dispatches, reports and tracks runs).
"""
