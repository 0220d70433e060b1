"""Call a function as root of a user namespace with the user's ID map, and get its result.

For work on files that belong to the mapped IDs without running a command: an import that
chowns to subordinate IDs, a removal of what a run left owned by them.  Root keeps the host's
IDs and calls the function in place.  Knows nothing of stores.
"""
from __future__ import annotations

import os
import pickle
import signal
from typing import Callable, TypeVar

from ..errors import OverlayfuseError
from ..sysmount import set_pdeathsig
from .idmaps import IdPlan, enter_user_namespace, plan_ids

T = TypeVar("T")


def run_as_mapped_root(fn: Callable[[], T], plan: IdPlan | None = None) -> T:
    """``fn()`` as ID 0 of a new user namespace with ``plan``'s maps (default: ``plan_ids()``),
    in a child process that dies with the caller; in this process for ``host``.  Its return
    value must pickle; an exception in it comes back as one OverlayfuseError line."""
    if plan is None:
        plan = plan_ids()
    if plan.mode == "host":
        return fn()
    r, w = os.pipe2(os.O_CLOEXEC)
    caller = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            set_pdeathsig(signal.SIGKILL)
            if os.getppid() != caller:
                raise OverlayfuseError("the caller is gone")
            enter_user_namespace(plan)
            reply: tuple[bool, object] = (True, fn())
        except OverlayfuseError as e:
            reply = (False, str(e))
        except BaseException as e:  # the child must always answer and exit here
            reply = (False, f"{type(e).__name__}: {e}")
        try:
            data = pickle.dumps(reply)
        except Exception as e:
            data = pickle.dumps((False, f"cannot return the result: {e}"))
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if not data:
        raise OverlayfuseError("the user-namespace helper died "
                               f"(status {os.waitstatus_to_exitcode(status)})")
    ok, value = pickle.loads(data)
    if not ok:
        raise OverlayfuseError(str(value))
    return value  # type: ignore[return-value]
