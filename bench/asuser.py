"""The benchmark as a normal user runs it: ``python -m bench --as-user NAME|UID``.

The FUSE backend exists for normal users, so that is where it must be measured: the FUSE
daemons (overlayfuse, fuse-overlayfs) are started by the user and mount through fusermount3
(no readahead tuning, no allow_other), and every workload runs in a process of that user.
The kernel's overlay, mounted by root, stays beside them as the limit (the user works in it as
in the others).  The harness itself stays root: it builds the layers, drops the caches and
reads the daemons' CPU and memory from /proc.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import stat
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def argv(self) -> list[str]:
        """The prefix that runs a command as this user (real and effective ids, no groups)."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]

    def give(self, *paths: Path) -> None:
        for p in paths:
            os.chown(p, self.uid, self.gid)


def own_layers(user: User, lowers: list[Path]) -> None:
    """Hand the cached lowers to the user once (``chown -R``), so that its workloads may copy
    up what they change, as in a user's own tree; a root run does not mind who owns them."""
    import subprocess
    for low in lowers:
        if os.lstat(low).st_uid != user.uid:
            subprocess.run(["chown", "-R", "-h", f"{user.uid}:{user.gid}", str(low)],
                           check=True, capture_output=True)


def resolve(spec: str) -> User:
    """A user by name or number; ValueError with a plain message otherwise."""
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        raise ValueError(f"no such user: {spec}") from None
    if pw.pw_uid == 0:
        raise ValueError("--as-user needs a normal user, not root")
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid)


@contextlib.contextmanager
def fuse_device_for_users(dev: str = "/dev/fuse") -> Iterator[None]:
    """/dev/fuse as a standard distribution has it (0666) for the run; the old mode after,
    unless it was open to everyone already (then someone else opened it, and closes it)."""
    old = stat.S_IMODE(os.stat(dev).st_mode)
    if old & 0o666 == 0o666:
        yield
        return
    os.chmod(dev, old | 0o666)
    try:
        yield
    finally:
        os.chmod(dev, old)


def timed_as(user: User, fn: Callable[..., Any], *args: Any) -> float:
    """Run ``fn(*args)`` in a forked child that is ``user``; the seconds it took there.

    The child times itself (fork and the switch of ids are not the workload's); an exception
    in it comes back as RuntimeError with the child's traceback.
    """
    import time
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            t0 = time.perf_counter()
            fn(*args)
            result: object = time.perf_counter() - t0
            code = 0
        except BaseException:  # noqa: BLE001 - everything must reach the parent
            result = traceback.format_exc(limit=4)
        try:
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data) if data else "the workload process died without a word"
    if isinstance(result, str):
        raise RuntimeError(f"as {user.name}: {result.strip().splitlines()[-1]}")
    return float(result)
