"""Terminating signals turned into exceptions, so a probe or a run that is killed still
unmounts and removes what it made (every ``finally`` runs).

Its own module because the state is process-wide (the handlers and the pending signal) and
``run`` and the backends use it as much as the probe does.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import OverlayfuseError


class Interrupted(BaseException):
    """A terminating signal turned into an exception, so every ``finally`` cleans up."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


_critical = 0
_pending: int | None = None
UNWIND_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _unwind_handler(sig: int, frame: object) -> None:
    global _pending
    if _critical:
        _pending = sig  # raised when the critical section ends
        return
    raise Interrupted(sig)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back the unwinding signals while a resource is created and not yet owned.

    A signal between "the daemon mounted" and "we know its PID" would leak the mount; inside
    this block it waits, and is raised at the end of the block (only when the block succeeded,
    so the caller's ``except``/``finally`` sees either its own error or the interruption).
    """
    global _critical, _pending
    _critical += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _critical -= 1
    if ok and _critical == 0 and _pending is not None:
        sig, _pending = _pending, None
        raise Interrupted(sig)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted`` for the block, so ``finally`` cleans
    up; afterwards the signal is re-delivered with the old handlers back (default: death).

    Only the main thread may install handlers; elsewhere the block relies on try/finally.
    Nested use is fine: the outermost block re-delivers.
    """
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is _unwind_handler:
        yield
        return
    old = {s: signal.signal(s, _unwind_handler) for s in UNWIND_SIGNALS}
    caught: int | None = None
    try:
        yield
    except Interrupted as e:
        caught = e.sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if _pending is not None and caught is None:
            caught, _pending = _pending, None
    if caught is not None:
        signal.raise_signal(caught)
        raise OverlayfuseError(f"interrupted by signal {caught}")
