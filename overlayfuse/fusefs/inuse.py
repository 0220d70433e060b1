"""One mount per upper dir and work dir, as the kernel's overlayfs keeps it (ovl_inuse_trylock).

Two mounts writing one upper dir would each trust their own view of it, and the second one's
start empties the work dir of the first one's copy-ups in flight.  The kernel marks both dirs
in use and refuses a second mount on either with EBUSY while the index is on (always, for this
daemon's hard-link index), or only warns with ``index=off``.  The daemon holds an exclusive
flock on each dir for its life: it goes with the daemon however that ends, SIGKILL included.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

from ..errors import OverlayfuseError
from ..spec import OverlaySpec

log = logging.getLogger(__name__)


def claim(spec: OverlaySpec) -> list[int]:
    """Lock the spec's upper and work dirs; the fds hold the locks (close them to release).
    Raises OverlayfuseError when another mount holds one and the index is on."""
    fds: list[int] = []
    try:
        for what, path in (("upperdir", spec.upperdir), ("workdir", spec.workdir)):
            if path is None:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if spec.option("index") == "off":
                    log.warning("%s %s is in use by another mount (index=off: mounting "
                                "anyway)", what, path)
                    continue
                raise OverlayfuseError(
                    f"{what} {path} is in use by another overlayfuse mount (EBUSY, as the "
                    f"kernel's overlayfs refuses it); unmount that one, or mount with "
                    f"-o index=off to override") from None
            fds.append(fd)
    except BaseException:
        release(fds)
        raise
    return fds


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
