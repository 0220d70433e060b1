"""Locks that die with their holder: flock(2) on files, never mkdir.

A layer in use holds ``locks/<id>`` (shared as a lower, exclusive as the upper of a writable
mount or run).  flock belongs to the open file, so a FUSE daemon forked by ``mount`` holds the
layers for as long as it serves, and the descriptors are inheritable, so the command ``run``
starts (and anything it leaves running in its mount namespace) holds them too: the layers
stay taken while anything can still write them, even when we are killed.  A probe on a fresh
descriptor (:func:`is_locked`) conflicts with those of this very process too.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Iterable


class LayerLocks:
    """The flock'ed descriptors of one use of some layers; ``release`` closes them."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def take(self, path: str, exclusive: bool) -> bool:
        """Lock ``path`` (created if missing) without waiting: False when someone holds it."""
        # read-only: root working on a user's store leaves lock files the user can still open
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        os.set_inheritable(fd, True)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fds.append(fd)
        return True

    def release(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def is_locked(path: str, exclusive_only: bool = False) -> bool:
    """Does anyone (this process included) hold ``path``? ``exclusive_only``: a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        mode = fcntl.LOCK_SH if exclusive_only else fcntl.LOCK_EX
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)


def lock_all(paths: Iterable[tuple[str, bool]]) -> LayerLocks | None:
    """Take every (path, exclusive) lock, or none of them: None when one is held."""
    locks = LayerLocks()
    for path, exclusive in paths:
        if not locks.take(path, exclusive):
            locks.release()
            return None
    return locks


def held_fresh(path: str) -> int:
    """Create ``path`` and hold it exclusively: its fd.  Re-checked after locking, so a
    ``gc`` that removed a not yet locked file in between cannot leave us holding a ghost."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        os.set_inheritable(fd, True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
