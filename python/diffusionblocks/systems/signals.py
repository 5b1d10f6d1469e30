"""SIGINT and SIGTERM during training: the loop finishes its step, writes a checkpoint and
stops with Interrupted, so a kill never loses more than one step."""

import contextlib
import signal
import threading
from typing import Callable


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved a checkpoint at `step` and stopped."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


@contextlib.contextmanager
def deferred_signals(on_signal: Callable[[int], None]):
    """While inside, SIGINT/SIGTERM only call on_signal(signum); the previous handlers come
    back on exit. Outside the main thread (where handlers cannot be installed) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: on_signal(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
