"""One mount per upper dir and work dir, as the kernel's overlayfs keeps it (ovl_inuse_trylock).

Two mounts writing one upper dir would each trust their own view of it, and the second one's
start empties the work dir of the first one's copy-ups in flight.  The kernel marks both dirs
in use and refuses a second mount on either with EBUSY while the index is on (always, for this
daemon's hard-link index), or only warns with ``index=off``.  The daemon holds an exclusive
flock on each dir for its life: it goes with the daemon however that ends, SIGKILL included.
The kernel's mark cannot be seen from here, so a kernel overlay's dirs are found by its mount
options instead; the kernel backend checks the flock before it mounts (backends/kernel.py).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time

from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from ..sysmount.fsinfo import mount_table, unescape_mountinfo

log = logging.getLogger(__name__)

DYING_WAIT = 60.0  # s: how long a lock held by a daemon on its way out is waited for


def claim(spec: OverlaySpec, kernel_mounts: bool = True) -> list[int]:
    """Lock the spec's upper and work dirs; the fds hold the locks (close them to release).
    Raises OverlayfuseError when another mount holds one and the index is on; a kernel
    overlay's counts too unless ``kernel_mounts`` is False (the kernel judges its own)."""
    fds: list[int] = []
    kernel = _kernel_overlay_dirs() if kernel_mounts and spec.upperdir is not None else {}
    try:
        for what, path in (("upperdir", spec.upperdir), ("workdir", spec.workdir)):
            if path is None:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(fd)
            holder = kernel.get((st.st_dev, st.st_ino))
            if holder is None and _lock(fd, st):
                fds.append(fd)
                continue
            os.close(fd)
            other = f"the kernel overlay on {holder}" if holder else "another overlayfuse mount"
            if spec.option("index") == "off":
                log.warning("%s %s is in use by %s (index=off: mounting anyway)", what, path,
                            other)
                continue
            raise OverlayfuseError(
                f"{what} {path} is in use by {other} (EBUSY, as the kernel's overlayfs "
                f"refuses it); unmount that one, or mount with -o index=off to override")
    except BaseException:
        release(fds)
        raise
    return fds


def _kernel_overlay_dirs() -> dict[tuple[int, int], str]:
    """(dev, ino) of the upper and work dirs of the kernel overlays mounted in this mount
    namespace -> their mount point.  The kernel's in-use mark cannot be read; its mount
    options can."""
    found: dict[tuple[int, int], str] = {}
    for entry in mount_table():
        if entry.fstype != "overlay":
            continue
        for item in entry.options.split(","):  # a comma in a path is escaped (\054)
            key, _, value = item.partition("=")
            if key in ("upperdir", "workdir") and value:
                try:
                    st = os.stat(unescape_mountinfo(value))
                except OSError:
                    continue
                found[(st.st_dev, st.st_ino)] = entry.mountpoint
    return found


def _lock(fd: int, st: os.stat_result) -> bool:
    """Take the exclusive lock on ``fd`` (of the file of ``st``); False when another mount keeps it.  A daemon that
    was killed holds it until its exit has closed its files (an fsync in flight can take a
    while): a remount right after a SIGKILL waits for that instead of failing."""
    deadline = time.monotonic() + DYING_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        holders = _holders(st)
        if time.monotonic() >= deadline or not holders or not all(map(_dying, holders)):
            return False
        time.sleep(0.02)


def _holders(st: os.stat_result) -> list[int]:
    """The pids /proc/locks names as holding a flock on the file of ``st``."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        pass
    return pids


_PF_EXITING = 0x4
_SIGKILL_BIT = 1 << 8


def _dying(pid: int) -> bool:
    """``pid`` is on its way out: exiting (PF_EXITING), or a SIGKILL waits for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
        if flags & _PF_EXITING:
            return True
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f
                       if line.startswith(("SigPnd:", "ShdPnd:"))]
    except (OSError, ValueError, IndexError):
        return True  # gone meanwhile: the lock goes with it
    return any(p & _SIGKILL_BIT for p in pending)


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
