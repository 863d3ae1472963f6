"""Stopping on a signal: SIGTERM or SIGINT in; recorded by a handler that only records it, and
acted on at a safe point (`check_stop`: between epochs, between trials) out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: finish the current trial as failed (not counted) and stop.

    Raised by `check_stop` at a safe point (between trials, after an epoch), never by the
    signal handler itself. A `BaseException`, so the objective's `except Exception` does
    not swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    # Blocked, not ignored: a SIGTERM that arrives meanwhile is handled right after.
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# The first SIGTERM or SIGINT received while `record_signals` is in force (0: none).
_stop_signal = 0


def record_signals() -> Callable[[], None]:
    """Install SIGTERM and SIGINT handlers that only record the signal; `check_stop`
    acts on it. Returns a function that puts the old handlers back.

    A handler that raised would lose the signal whenever it lands in code that discards
    exceptions (a `__del__`, such as TensorFlow's garbage collector of concrete functions:
    "Exception ignored in ..."), and the worker would run on.
    """
    global _stop_signal
    _stop_signal = 0
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        global _stop_signal
        _stop_signal = _stop_signal or signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in old.items()] and None


def stop_requested() -> bool:
    """True once a signal recorded by `record_signals` asks this process to stop."""
    return bool(_stop_signal)


def stop_signal() -> int:
    """The signal `record_signals` recorded first (0: none)."""
    return _stop_signal


def check_stop() -> None:
    """A safe point: raise `Interrupted` if a SIGTERM or SIGINT has been recorded."""
    if _stop_signal:
        raise Interrupted(_stop_signal)
