"""Open files (file.c): handles on the backing file that holds the data right now.

Opening for write copies up first.  A handle opened read-only on a lower file notices the
copy-up on its next read and reopens the upper copy, so it sees the new data (the rpm
database problem that mock's ``touch_rpmdb`` works around with the kernel's old overlayfs).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os

import pyfuse3
import trio

from . import falloc, transport
from .copy_up import copy_data, copy_up_async
from .inodes import ROOT, Node
from .layers import openat2_beneath
from .overlay import Overlay

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | _O_DIRECT
log = logging.getLogger(__name__)


class FileHandle:
    __slots__ = ("node", "fd", "flags", "source")

    def __init__(self, node: Node, fd: int, flags: int, source: tuple) -> None:
        self.node = node
        self.fd = fd
        self.flags = flags
        self.source = source  # where fd points: (upper?, index name) at open time


_handles: dict[int, FileHandle] = {}
_next_fh = itertools.count(1)


def _source(ovl: Overlay, node: Node) -> tuple:
    """Where a handle's fd points: the upper copy or an index entry, in this layer stack (a
    switch (switch.py) freezes the upper: a handle opened before then points into a lower)."""
    return (node.upper, node.index, ovl.epoch)


def _register(ovl: Overlay, handle: FileHandle) -> int:
    fh = next(_next_fh)
    _handles[fh] = handle
    handle.node.open_count += 1
    ovl.handles_by_ino.setdefault(handle.node.ino, []).append(handle)
    return fh


def get_handle(fh: int) -> FileHandle:
    try:
        return _handles[fh]
    except KeyError:
        raise pyfuse3.FUSEError(errno.EBADF) from None


def upper_handle_fd(ovl: Overlay, fh: int) -> int:
    """The handle's fd if it points at the upper copy, else -1 (see attrs.setattr_node)."""
    handle = _handles.get(fh)
    if handle is None or not handle.source[0] or handle.source[2] != ovl.epoch:
        return -1
    return handle.fd


def file_info(ovl: Overlay, fh: int) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=fh, keep_cache=ovl.config.keep_cache)


def backing_flags(ovl: Overlay, flags: int) -> int:
    """The open flags for the backing file.  With the writeback cache the kernel appends
    itself and writes whole pages, reading the rest of a page first: a write-only open
    becomes read-write and O_APPEND goes (pwrite on an O_APPEND fd would append again)."""
    if ovl.config.writeback:
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        flags &= ~os.O_APPEND
    return flags


def open_backing(ovl: Overlay, node: Node, flags: int) -> int:
    asked = (flags & ~_STRIP) | os.O_NOFOLLOW | os.O_CLOEXEC
    flags = backing_flags(ovl, asked)
    if node.parent is None and node.ino != ROOT:
        return _reopen_nameless(ovl, node, flags)
    dirfd, name = ovl.location(node)
    if flags != asked and asked & os.O_ACCMODE == os.O_WRONLY:
        try:
            return os.open(name, flags, dir_fd=dirfd)
        except PermissionError:
            # a file its owner may write but not read (mode 0200, a daemon without
            # CAP_DAC_OVERRIDE): write-only, as asked; only partial-page writes then fail
            return os.open(name, asked & ~os.O_APPEND, dir_fd=dirfd)
    if node.upper and node.index is None and node.ino != ROOT:  # the mount's atime option
        if ovl.config.atime == "noatime":
            try:  # only the owner or CAP_FOWNER may ask for it
                return os.open(name, flags | os.O_NOATIME, dir_fd=dirfd)
            except PermissionError:
                pass
        if ovl.strict_fd >= 0 and flags & os.O_ACCMODE == os.O_RDONLY:
            return openat2_beneath(ovl.strict_fd, node.upath(), flags)
    if not node.upper and node.index is None:
        # as the kernel's overlay: reading a lower file leaves its atime alone (O_NOATIME,
        # which only the file's owner or CAP_FOWNER may ask for)
        try:
            return os.open(name, flags | os.O_NOATIME, dir_fd=dirfd)
        except PermissionError:
            pass
    return os.open(name, flags, dir_fd=dirfd)


def _reopen_nameless(ovl: Overlay, node: Node, flags: int) -> int:
    """An unlinked file still open elsewhere, opened again through a file handle
    (xfstests generic/467): reopen the data through an fd this daemon already holds."""
    held = ovl.open_fd(node, writable_layer=(flags & os.O_ACCMODE) != os.O_RDONLY)
    if held < 0:
        raise pyfuse3.FUSEError(errno.ESTALE)
    return os.open(f"/proc/self/fd/{held}", flags & ~os.O_NOFOLLOW)


async def open_node(ovl: Overlay, node: Node, flags: int) -> pyfuse3.FileInfo:
    if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
        ovl.require_writable()
        await copy_up_async(ovl, node)
        if flags & os.O_TRUNC:
            ovl.changed(node)
    fd = open_backing(ovl, node, flags)
    return file_info(ovl, _register(ovl, FileHandle(node, fd, flags, _source(ovl, node))))


def adopt_fd(ovl: Overlay, node: Node, fd: int, flags: int) -> pyfuse3.FileInfo:
    """A handle for an fd made by create()."""
    return file_info(ovl, _register(ovl, FileHandle(node, fd, flags, _source(ovl, node))))


def _current_fd(ovl: Overlay, handle: FileHandle) -> int:
    node = handle.node
    if handle.source != _source(ovl, node) and node.parent is not None \
            and handle.source[0] != ORPHAN:
        flags = handle.flags & ~os.O_TRUNC
        if not node.upper and node.index is None:
            # a switch left the file in a lower (file._writable_fd copies it up to write)
            flags = flags & ~(os.O_ACCMODE | os.O_APPEND) | os.O_RDONLY
        fd = open_backing(ovl, node, flags)
        os.close(handle.fd)
        handle.fd, handle.source = fd, _source(ovl, node)
    return handle.fd


def read(ovl: Overlay, fh: int, off: int, size: int) -> bytes:
    return os.pread(_current_fd(ovl, get_handle(fh)), size, off)


ORPHAN = "orphan"  # a handle's source once its fd is a private copy (see _writable_fd)


async def _writable_fd(ovl: Overlay, handle: FileHandle) -> int:
    """The handle's fd for a change.  One opened before a switch (switch.py) may point into a
    layer that is a lower now: a file that still has a name is copied up into the new upper
    first (a frozen layer is never written again); one whose name went with the switch goes
    on as an unlinked file, in a private copy that no layer holds."""
    node = handle.node
    current = handle.source == _source(ovl, node)
    if handle.source[0] == ORPHAN or current and (node.upper or node.index is not None):
        return handle.fd
    if node.parent is not None or node.ino == ROOT:
        await copy_up_async(ovl, node)
        return _current_fd(ovl, handle)
    fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=ovl.work_fd)
    try:
        src = os.open(f"/proc/self/fd/{handle.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(src)
            copy_data(src, fd, st.st_size)
        finally:
            os.close(src)
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, st.st_mode & 0o7777)
    except BaseException:
        os.close(fd)
        raise
    os.close(handle.fd)
    handle.fd, handle.source = fd, (ORPHAN, None, ovl.epoch)
    return fd


async def write(ovl: Overlay, fh: int, off: int, buf: bytes) -> int:
    handle = get_handle(fh)
    fd = await _writable_fd(ovl, handle)
    handle.node.st = None
    written = os.pwrite(fd, buf, off)
    if handle.flags & _O_DIRECT and not transport.declines_async_dio():
        await _drop_page_cache(handle.node.ino)
    return written


async def fallocate(ovl: Overlay, fh: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on the handle's fd: the kernel sends it only for a file opened for write,
    which the open copied up, so the fd is the upper copy's.  The kernel updates its cached
    size and drops the punched pages itself once we reply (fs/fuse/file.c)."""
    handle = get_handle(fh)
    fd = await _writable_fd(ovl, handle)
    handle.node.st = None
    await falloc.fallocate(fd, mode, offset, length)


DROP_WAIT = 0.1  # s a direct write waits for the drop of its stale pages before replying


class _Drops:
    """Page-cache drops of one inode: the round running, and the one asked for meanwhile."""

    __slots__ = ("running", "next")

    def __init__(self) -> None:
        self.running = trio.Event()  # set when the running round is over
        self.next: trio.Event | None = None


_drops: dict[int, _Drops] = {}


async def _drop_page_cache(ino: int) -> None:
    """After an O_DIRECT write on stock pyfuse3, which keeps the kernel's asynchronous direct
    I/O: the kernel then leaves the pages an aio direct write made stale in its page cache,
    and a buffered read after the write's completion returned the old data (xfstests
    generic/451).  The drop waits for page locks that readahead and writeback requests hold
    while they wait for one of the connection's few background slots, and an unanswered
    direct write holds one: waited for without a bound, enough of them deadlocked the mount
    (generic/095).  So the drop runs beside the request, which waits for a round that began
    after its write for at most DROP_WAIT, and replies."""
    drops = _drops.get(ino)
    if drops is None:
        drops = _drops[ino] = _Drops()
        done = drops.running
        trio.lowlevel.spawn_system_task(_drop_rounds, ino, drops)
    else:
        if drops.next is None:
            drops.next = trio.Event()
        done = drops.next
    with trio.move_on_after(DROP_WAIT):
        await done.wait()


async def _drop_rounds(ino: int, drops: _Drops) -> None:
    while True:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            log.debug("page cache of inode %d not dropped: %s", ino, e)
        drops.running.set()
        if drops.next is None:
            del _drops[ino]
            return
        drops.running, drops.next = drops.next, None


async def fsync(ovl: Overlay, fh: int, datasync: bool) -> None:
    """Slow: run off the trio thread so other requests go on (PYFUSE3-FACTS).  A ``volatile``
    overlay skips syncs altogether, as the kernel's does."""
    if ovl.spec.volatile:
        return
    fd = get_handle(fh).fd
    await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)


def release(ovl: Overlay, fh: int) -> None:
    handle = _handles.pop(fh, None)
    if handle is None:
        return
    os.close(handle.fd)
    node = handle.node
    node.open_count -= 1
    ovl.forget_handle(handle)
    ovl.table.maybe_drop(node)
