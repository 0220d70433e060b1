"""fallocate(2) on a backing fd, as the kernel's overlayfs passes it to the upper filesystem.

The mode goes through unchanged, so the upper filesystem decides: a mode it lacks is its
EOPNOTSUPP, not ours.  ``os.posix_fallocate`` would not do even for mode 0: glibc falls back to
writing zeros where the filesystem refuses, which the kernel's overlay never does.  A large
range can take a while (tmpfs clears pages, some filesystems zero blocks), so it runs off the
trio thread on an fd of its own (PYFUSE3-FACTS: slow calls in threads; the caller's fd may be
closed by another request meanwhile).
"""
from __future__ import annotations

import ctypes
import os

import trio

# below this, the call runs inline: a thread hand-over costs more than a small allocation
THREAD_FROM = 8 << 20

_libc = ctypes.CDLL(None, use_errno=True)  # not find_library: it runs ldconfig at start
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate_sync(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself; an error is the OSError of its errno."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


async def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on ``fd``, in a thread (on a dup of ``fd``) when the range is large."""
    if length < THREAD_FROM:
        fallocate_sync(fd, mode, offset, length)
        return
    own = os.dup(fd)
    try:
        await trio.to_thread.run_sync(fallocate_sync, own, mode, offset, length)
    finally:
        os.close(own)
