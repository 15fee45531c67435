"""Detectors (``detectors.py``), their backbones and weight loading. Import the modules themselves:
this package imports nothing, so pre-training loads only the tiny backbone."""
