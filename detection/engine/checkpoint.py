"""Reading a run's checkpoint: tensors and plain values only, so nothing in the file can run."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file is corrupt or not a checkpoint of tensors and plain values; the message names it."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The Lightning checkpoint at ``path``, loaded with ``weights_only=True``.

    Any other object in the file (a class instance, a function: pickle payloads that would run code
    when loaded) is refused, never constructed.
    """
    fix = "delete it and train again (or restore the file)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused to load: the file is corrupt or holds objects other than tensors "
                              f"and plain values (which could run code; none was run); {fix}") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "truncated or empty"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {detail}); {fix}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a checkpoint written by `libra train` (no state_dict); {fix}")
    return checkpoint
