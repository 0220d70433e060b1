"""Running a trial in a forked child: it cannot hang the probe (killed after a timeout), dies
with it (PDEATHSIG), and its failure comes back as a one-line reason, never a traceback.

The kernel trials need it for their private mount namespace; it is kept apart from the trials
because it is about processes, not overlays.
"""
from __future__ import annotations

import os
import select
import signal
import time
from typing import Callable

from .. import sysmount

TRIAL_TIMEOUT = 20.0


def in_child(fn: Callable[[], str], timeout: float = TRIAL_TIMEOUT) -> tuple[bool, str]:
    """Run ``fn`` in a forked child and return (ok, message); its exception text is the reason.

    The child dies with us (PDEATHSIG) and is killed after ``timeout``, so a hung filesystem
    cannot hang the probe.  It never returns into the caller's code.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            sysmount.set_pdeathsig(signal.SIGKILL)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            msg = "ok " + fn()
            code = 0
        except BaseException as e:  # the reason goes to the parent, never a traceback
            msg = "no " + _describe(e)
        try:
            os.write(w, msg.encode(errors="replace")[:65536])
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    finished = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 65536)
            if not data:
                finished = True
                break
            chunks.append(data)
    finally:
        os.close(r)
        if not finished:  # timed out, or we are being interrupted
            _kill(pid)
        _reap(pid)
    if timed_out:
        return False, f"the trial did not finish within {timeout:.0f} s"
    msg = b"".join(chunks).decode(errors="replace")
    if not msg:
        return False, "the trial process died without an answer"
    return msg.startswith("ok "), msg[3:]


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass

