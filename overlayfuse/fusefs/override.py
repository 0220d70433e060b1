"""fuse-overlayfs' ``xattr_permissions=1|2``: owners and modes kept in an xattr, not on disk.

A rootless user cannot chown files to other IDs; fuse-overlayfs then stores each file's
shown owner and mode in an xattr, ``uid:gid:mode`` (decimal IDs, octal mode), and leaves the
backing file owned by the daemon's user with mode ``| 0755`` (so the daemon can always read
and traverse what it stores; here without setuid/setgid/sticky bits, see ``backing_mode``).
The facts, from fuse-overlayfs 1.10 (Debian's) and later:

- names: ``security.fuseoverlayfs.override_stat`` (=1, needs privilege to write),
  ``user.fuseoverlayfs.override_stat`` (=2), and ``user.containers.override_stat``, which
  containers/storage writes on the layers it unpacks;
- each layer says on its root which one it uses, tried in that order; the upper layer uses
  the option's name, written on its root at mount when missing (1.10's rule; from 1.14 =2
  writes ``user.containers.override_stat`` instead, so an upper whose root has only that
  name keeps it);
- only directories and regular files are overridden; symlinks, devices, fifos and sockets
  show their real owner and mode (in 1.10 and 1.16 alike);
- a later version's value may carry a fourth field (the file type, ``...:file``): read, and
  the type ignored, as only files and dirs are overridden.

Owners in the xattr are on-disk IDs: ``uidmapping=``/``gidmapping=`` and squashing apply on
top of them exactly as they apply to real owners (fuse-overlayfs' order too).

Unlike fuse-overlayfs, lower layers' override xattrs are honoured only when the option is
given: a root mount must not show a file as setuid root because a user wrote an xattr.
containers/storage gives the option itself (``xattr_permissions=2`` with ``force_mask``) when
it mounts the layers it wrote so.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

from .. import format as fmt
from ..errors import OverlayfuseError
from .layers import Layer

log = logging.getLogger(__name__)

PRIVILEGED = b"security.fuseoverlayfs.override_stat"
USER = b"user.fuseoverlayfs.override_stat"
CONTAINERS = b"user.containers.override_stat"
NAMES = (PRIVILEGED, USER, CONTAINERS)  # the order fuse-overlayfs tries on a layer's root
BY_LEVEL = {1: PRIVILEGED, 2: USER}
BACKING_BITS = 0o755  # added to the backing file's mode: the daemon must reach what it stores


def parse(value: bytes) -> tuple[int, int, int] | None:
    """(uid, gid, permission bits) of an override value, None when it is not one."""
    fields = value.rstrip(b"\0").split(b":", 3)
    if len(fields) < 3:
        return None
    try:
        uid, gid, mode = int(fields[0]), int(fields[1]), int(fields[2], 8)
    except ValueError:
        return None
    if not (_MIN_ID <= uid < _ID_LIMIT and _MIN_ID <= gid < _ID_LIMIT) or mode < 0:
        return None
    # fuse-overlayfs 1.10 stores the -1 of a chown that keeps an ID; it reads it back (%d
    # into a uid_t) as 4294967295, which the kernel shows as the overflow ID: so do we
    return uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, mode & 0o7777


_MIN_ID, _ID_LIMIT = -(1 << 31), 1 << 32


def encode(uid: int, gid: int, mode: int) -> bytes:
    return b"%d:%d:%o" % (uid, gid, stat.S_IMODE(mode))


def applies(mode: int) -> bool:
    """Only directories and regular files carry an override (fuse-overlayfs' rule)."""
    return stat.S_ISDIR(mode) or stat.S_ISREG(mode)


def _root_name(root_fd: int) -> bytes | None:
    root = fmt.proc_path(root_fd, b"")  # layer roots are O_PATH fds: reached by their link
    for name in NAMES:
        try:
            os.getxattr(root, name)
            return name
        except OSError:
            continue
    return None


class Overrides:
    """Which override xattr each layer uses (None: real owners), and reading/writing them."""

    def __init__(self, layers: list[Layer], has_upper: bool, level: int) -> None:
        self.level = level
        self.names: list[bytes | None] = [None] * len(layers)
        self.upper_name = BY_LEVEL.get(level, USER)
        if not level:
            return
        for layer in layers:
            self.names[layer.index] = _root_name(layer.root_fd)
        if has_upper:
            if level == 2 and self.names[0] == CONTAINERS:
                # an upper fuse-overlayfs >= 1.14 wrote (=2 uses this name there): keep it
                self.upper_name = CONTAINERS
            self.names[0] = self.upper_name
            self._mark_upper(layers[0])

    @property
    def active(self) -> bool:
        return self.level != 0

    def _mark_upper(self, upper: Layer) -> None:
        """Record the upper's own owner and mode on its root, as fuse-overlayfs does: that is
        what tells a later reader the layer keeps its owners in this xattr."""
        name, root = self.upper_name, fmt.proc_path(upper.root_fd, b"")
        try:
            os.getxattr(root, name)
            return
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise OverlayfuseError(f"xattr_permissions={self.level}: cannot read "
                                       f"{name.decode()} on {upper.path}: {e.strerror}") from None
        st = os.fstat(upper.root_fd)
        try:
            os.setxattr(root, name, encode(st.st_uid, st.st_gid, st.st_mode))
        except OSError as e:
            raise OverlayfuseError(f"xattr_permissions={self.level}: cannot write "
                                   f"{name.decode()} on {upper.path}: {e.strerror}") from None

    def hidden(self, name: bytes) -> bool:
        """The override xattrs are the overlay's bookkeeping: not shown, not settable."""
        return self.active and name in NAMES

    def read(self, layer: int, path: bytes | int, follow: bool) -> tuple[int, int, int] | None:
        """The override stored on an entry of ``layer`` (a path or an fd), None if none."""
        name = self.names[layer]
        if name is None:
            return None
        return self._get(name, path, follow)

    def read_any(self, fd: int) -> tuple[int, int, int] | None:
        """The override of an open file whose layer is unknown (its last name is gone)."""
        for name in dict.fromkeys([self.upper_name, *NAMES]):
            found = self._get(name, fd, True)
            if found is not None:
                return found
        return None

    @staticmethod
    def _get(name: bytes, path: bytes | int, follow: bool) -> tuple[int, int, int] | None:
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError:
            return None
        found = parse(value)
        if found is None:
            log.warning("ignoring malformed %s value %r", name.decode(), value)
        return found

    def write(self, path: bytes | int, follow: bool, uid: int, gid: int, mode: int) -> None:
        """Store an upper entry's owner and mode (on-disk IDs) in the upper's xattr."""
        os.setxattr(path, self.upper_name, encode(uid, gid, mode), follow_symlinks=follow)

    @staticmethod
    def backing_mode(mode: int) -> int:
        """The mode on disk: never setuid, setgid or sticky (the backing file is the daemon's,
        root's on a root mount: a setuid bit there would be a real one on the upper fs)."""
        return (mode & 0o777) | BACKING_BITS
