"""Common random numbers for paired runs: every module draws its initial weights from a stream of its own.

A module's stream is seeded by the run's seed and the module's name (``stream_seed``), so at the same
seed a variant that adds a module (the BFP neck) or builds another one starts every module it shares
with its baseline from exactly the baseline's weights, and building a detector draws nothing from the
global stream that training uses afterwards. A difference between the two runs then comes from the
component, not from a shifted random stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for module ``name`` of a run with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def init_stream(seed: int, name: str) -> Iterator[None]:
    """Modules built inside draw from ``name``'s stream; the global CPU stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, name))
        yield
