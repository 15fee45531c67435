"""SIGTERM and SIGINT as a request to stop: one way to install a handler for both and restore the previous ones."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["STOP_SIGNALS", "StopRequest", "handling_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], None]


@contextmanager
def handling_stop_signals(handler: Handler) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT while in this block, the previous handlers after it. Only the
    main thread can set handlers: in another thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class StopRequest:
    """A handler that records the first stop signal in ``signum``; a second one ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
