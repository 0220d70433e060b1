"""Files reached by inode (zero-message opens): a bounded cache of backing fds.

With zero-message opens (transport.py) the kernel never sends OPEN or RELEASE: READ, WRITE,
FALLOCATE and FSYNC name the inode only.  So the daemon keeps one backing fd per recently used
inode, the least recently used closed first, never more than ``capacity``.  Each fd is tagged
with where it points (the lower file, the upper copy, the index entry): after a copy-up the next
read reopens the copy, so a reader that opened the file before the copy-up sees the new data, as
the kernel's overlayfs shows it.  The first write or fallocate copies up (there is no
open-for-write to hang it on).  A file that loses its last name while the kernel may still hold
it open keeps its fd, pinned, until the kernel forgets the inode: its data has no other way in.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import stat
from collections import OrderedDict

import trio

from . import falloc
from .copy_up import copy_data, copy_up_async
from .file import open_backing
from .inodes import Node
from .overlay import Overlay

log = logging.getLogger(__name__)

SHARE_OF_NOFILE = 4      # at most a quarter of the fd limit
MAX_CAPACITY = 16384


def default_capacity() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(MAX_CAPACITY, soft // SHARE_OF_NOFILE))


class _Entry:
    __slots__ = ("fd", "source", "writable")

    def __init__(self, fd: int, source: tuple, writable: bool) -> None:
        self.fd, self.source, self.writable = fd, source, writable


def _source(node: Node) -> tuple:
    """Where the node's data is now; the node itself is part of it, so an inode number that a
    new file took over never reaches the old file's fd."""
    return (id(node), node.upper, node.index)


class InodeFiles:
    """The backing fds of one mount, by inode number."""

    def __init__(self, ovl: Overlay, capacity: int | None = None) -> None:
        self.ovl = ovl
        self.capacity = capacity or default_capacity()
        self._fds: OrderedDict[int, _Entry] = OrderedDict()
        self._pinned: dict[int, _Entry] = {}

    # -- the fds ---------------------------------------------------------------------------
    def _entry(self, node: Node, writable: bool) -> _Entry:
        pinned = self._pinned.get(node.ino)
        if pinned is not None:
            return pinned  # its names are gone: this fd is all there is
        entry = self._fds.get(node.ino)
        if entry is not None and entry.source == _source(node) and (entry.writable or not writable):
            self._fds.move_to_end(node.ino)
            return entry
        # upper data is opened read-write at once, so a later write needs no second open
        rw = writable or (node.upper or node.index is not None) and self.ovl.upper is not None
        try:
            fd = open_backing(self.ovl, node, os.O_RDWR if rw else os.O_RDONLY)
        except PermissionError:
            if writable:
                raise
            rw, fd = False, open_backing(self.ovl, node, os.O_RDONLY)
        if entry is not None:
            os.close(entry.fd)
        entry = self._fds[node.ino] = _Entry(fd, _source(node), rw)
        self._fds.move_to_end(node.ino)
        while len(self._fds) > self.capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old.fd)
        return entry

    def read(self, node: Node, off: int, size: int) -> bytes:
        return os.pread(self._entry(node, False).fd, size, off)

    async def write(self, node: Node, off: int, buf: bytes) -> int:
        return os.pwrite(await self._changing(node), buf, off)

    async def fallocate(self, node: Node, mode: int, offset: int, length: int) -> None:
        """As a write: the first one copies a lower file up, then it goes to the upper fd."""
        await falloc.fallocate(await self._changing(node), mode, offset, length)

    async def _changing(self, node: Node) -> int:
        """The fd a change to ``node``'s data goes to: the first change copies a lower file up."""
        self.ovl.require_writable()
        if node.ino in self._pinned:
            fd = self._writable_pinned(node)
        else:
            await copy_up_async(self.ovl, node)
            fd = self._entry(node, True).fd
        node.st = None
        return fd

    def _writable_pinned(self, node: Node) -> int:
        """A nameless file's fd that takes writes: a lower file unlinked while open gets an
        unnamed copy in work/ (O_TMPFILE), which the kernel's overlay would have made at the
        open for write and then unlinked with the name."""
        entry = self._pinned[node.ino]
        if entry.writable:
            return entry.fd
        st = os.fstat(entry.fd)
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, stat.S_IMODE(st.st_mode),
                     dir_fd=self.ovl.work_fd)
        try:
            copy_data(entry.fd, fd, st.st_size)
            overrides = self.ovl.overrides
            kept = overrides.read_any(entry.fd) if overrides.active else None
            if kept is not None:  # xattr_permissions: the owner and mode it showed go along
                overrides.write(fd, True, *kept)
                os.fchmod(fd, overrides.backing_mode(kept[2]))
            else:
                if self.ovl.config.as_root:
                    os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
        except BaseException:
            os.close(fd)
            raise
        os.close(entry.fd)
        entry.fd, entry.writable = fd, True
        return fd

    async def fsync(self, node: Node, datasync: bool) -> None:
        """Slow: off the trio thread (PYFUSE3-FACTS); a volatile overlay skips syncs."""
        if self.ovl.spec.volatile:
            return
        fd = self._entry(node, False).fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    def upper_fd(self, node: Node) -> int:
        """The writable fd of a nameless file (its setattr has no path to go by), else -1."""
        if node.ino not in self._pinned or not stat.S_ISREG(node.kind):
            return -1  # a removed dir's (symlink's...) fd is O_PATH: no changes through it
        return self._writable_pinned(node)

    def adopt(self, node: Node, fd: int, flags: int) -> None:
        """The fd ``create`` made on the new upper file: kept when it can serve reads and
        writes alike, else closed (the first request opens one that can)."""
        old = self._fds.pop(node.ino, None)
        if old is not None:
            os.close(old.fd)
        if flags & os.O_ACCMODE != os.O_RDWR or flags & os.O_APPEND:
            os.close(fd)
            return
        self._fds[node.ino] = _Entry(fd, _source(node), True)

    # -- life and death --------------------------------------------------------------------
    def pin(self, node: Node) -> None:
        """Before ``node`` loses a name that may be its last: keep an fd on its data (a file)
        or on itself (anything else: a removed dir still answers fstat, and no new entry
        takes its number while the kernel holds it: see Overlay.keep_reachable)."""
        if node.ino in self._pinned:
            return
        try:
            if not stat.S_ISREG(node.kind):  # its inode held, so its number stays its own
                dirfd, name = self.ovl.location(node)
                fd = os.open(name or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                self._pinned[node.ino] = _Entry(fd, _source(node), False)
                return
            entry = self._entry(node, False)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES, errno.ELOOP, errno.ENXIO):
                raise
            return  # nothing to keep (a file we may not open)
        del self._fds[node.ino]
        self._pinned[node.ino] = entry

    def pinned_fd(self, node: Node) -> int:
        entry = self._pinned.get(node.ino)
        return entry.fd if entry is not None else -1

    def forget(self, ino: int) -> None:
        """The kernel forgot the inode: nothing can reach it through this mount any more."""
        entry = self._pinned.pop(ino, None) or self._fds.pop(ino, None)
        if entry is not None:
            os.close(entry.fd)

    def close(self) -> None:
        for entry in [*self._fds.values(), *self._pinned.values()]:
            os.close(entry.fd)
        self._fds.clear()
        self._pinned.clear()
