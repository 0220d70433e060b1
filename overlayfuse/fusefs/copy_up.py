"""Copy-up: bring a lower entry into the upper layer before its first change (copy_up.c).

The copy is built under a temporary name in ``work/`` (data, owner, mode, xattrs, then times)
and renamed into place, so a crash or a killed daemon leaves either no upper entry or a
complete one, never half a file.  Parents are copied up first.  A multiply-linked file is also
linked into the hard-link index, so its other names find the copy (the kernel's ``index=on``).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat

import pyfuse3
import trio

from .. import format as fmt
from . import durable, index, origin, override
from .inodes import Node
from .overlay import Overlay

log = logging.getLogger(__name__)
_tmp_names = itertools.count()
_COPY_CHUNK = 64 << 20
LARGE_COPY = 4 << 20  # bigger copies run in a worker thread


def temp_name() -> bytes:
    return b"#ovf%x" % next(_tmp_names)


def copy_up(ovl: Overlay, node: Node) -> None:
    """Make ``node``'s data and attributes writable in the upper layer, its ancestors first.

    An indexed inode (see index.py) needs nothing: its index file is already the upper copy
    that every name shares.
    """
    if node.upper or node.index is not None:
        return
    ovl.require_writable()
    chain = []
    while not node.upper:
        chain.append(node)
        node = node.parent_and_name()[0]
    for item in reversed(chain):
        _copy_up_one(ovl, item, *item.parent_and_name())


def copy_up_name(ovl: Overlay, parent: Node, name: bytes, node: Node) -> None:
    """Namespace changes (rename) need this very name in the upper, not just the inode."""
    copy_up(ovl, parent)
    if node.index is not None:
        with index.Counting(ovl, node, 0):  # one more upper link, the same names
            try:
                os.link(node.index, name, src_dir_fd=ovl.index_fd,
                        dst_dir_fd=ovl.upper_dirfd(parent), follow_symlinks=False)
            except FileExistsError:
                pass  # this name is in the upper already
        return
    if not node.upper:
        _copy_up_one(ovl, node, parent, name)


def _copy_up_one(ovl: Overlay, node: Node, parent: Node, name: bytes) -> None:
    job = _CopyJob(ovl, node, parent, name)
    with job:
        job.copy_data()
        job.finish()


class _CopyJob:
    """One entry's copy-up, in three steps so the data copy can run off the trio thread:
    begin (in __init__: the temp entry in work/ and, for files, both fds), ``copy_data`` (fds
    only: safe in a worker thread), ``finish`` (metadata, index, rename into place).  Leaving
    the ``with`` block without ``finish`` removes the temp entry: the upper is untouched."""

    def __init__(self, ovl: Overlay, node: Node, parent: Node | None, name: bytes) -> None:
        ovl.changed(node, *([parent] if parent is not None else []))
        self.ovl, self.node, self.parent, self.name = ovl, node, parent, name
        self.src_dir, self.src_name = ovl.lower_location(node)
        self.st = st = os.stat(self.src_name, dir_fd=self.src_dir, follow_symlinks=False)
        self.tmp = temp_name()
        self.src = self.dst = -1
        self.done = False
        work = ovl.work_fd
        if stat.S_ISREG(st.st_mode):
            self.src = os.open(self.src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=self.src_dir)
            self.dst = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600, dir_fd=work)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(self.tmp, 0o700, dir_fd=work)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(self.src_name, dir_fd=self.src_dir), self.tmp, dir_fd=work)
        else:
            os.mknod(self.tmp, st.st_mode, st.st_rdev, dir_fd=work)

    @property
    def slow(self) -> bool:
        """Worth a worker thread: a big copy, or any copy that ends in an fsync (milliseconds
        on a disk, during which the loop could serve everyone else).  A small copy made
        durable by ``sync_file_range`` on a journalled upper (durable.py) stays inline: the
        hop to a thread would cost more than the write."""
        return self.src >= 0 and (self.st.st_size >= LARGE_COPY
                                  or self.ovl.copy_sync == durable.FSYNC)

    def copy_data(self) -> None:
        if self.src < 0:
            return
        copy_data(self.src, self.dst, self.st.st_size)
        # as the kernel: the copy is durable before it replaces the lower (not with volatile)
        durable.make_durable(self.dst, self.ovl.copy_sync)

    def finish(self) -> None:
        ovl, node, st, work = self.ovl, self.node, self.st, self.ovl.work_fd
        copy_metadata(ovl, self.src_dir, self.src_name, work, self.tmp, st, node.ino,
                      node.lower[0][0])
        fh = ovl.origin_of(node.lower[0][0], self.src_dir, self.src_name)
        if fh is not None:
            _set_private(ovl, work, self.tmp, b"origin", fh)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and ovl.index_fd >= 0 and fh:
            index.add(ovl, self.tmp, node, origin.index_name(fh))
        if self.parent is None:  # index only: the index entry is the copy
            os.unlink(self.tmp, dir_fd=work)
            self._counted()
            self.done = True
            return
        udir = ovl.upper_dirfd(self.parent)
        before = os.fstat(udir)
        os.rename(self.tmp, self.name, src_dir_fd=work, dst_dir_fd=udir)
        mark_impure(ovl, udir)
        # as the kernel: a copy-up does not show in the parent's times
        os.utime(fmt.proc_path(udir, b""), ns=(before.st_atime_ns, before.st_mtime_ns))
        node.upper = True
        self._counted()
        self.done = True
        if node.is_dir and node.lookups > 0:
            # it is a merged directory now, whose link count the kernel reports as 1: drop the
            # attributes the kernel cached (attributes only: no locks, safe inside a request)
            pyfuse3.invalidate_inode(node.ino, attr_only=True)

    def _counted(self) -> None:
        """An indexed copy now has its final links: record its names (all lower ones)."""
        if self.node.index is not None:
            index.set_nlink(self.ovl, self.node, self.st.st_nlink)

    def __enter__(self) -> "_CopyJob":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.src, self.dst):
            if fd >= 0:
                os.close(fd)
        if not self.done:
            self.node.index = None
            _remove_temp(self.ovl.work_fd, self.tmp)


def copy_up_to_index(ovl: Overlay, node: Node) -> None:
    """Copy a hard-linked lower file into the index only, before one of its names goes away,
    so the names left keep a true link count (the kernel does the same with index=on)."""
    if node.index is not None or node.upper or ovl.index_fd < 0:
        return
    with _CopyJob(ovl, node, None, b"") as job:
        job.copy_data()
        job.finish()


async def copy_up_async(ovl: Overlay, node: Node) -> None:
    """copy_up for the request paths that may meet big files (open for write, truncate):
    the data copy runs in a worker thread so other requests go on; one copy per inode."""
    if node.upper or node.index is not None:
        return
    ovl.require_writable()
    parent, name = node.parent_and_name()
    copy_up(ovl, parent)
    lock = ovl.copy_locks.setdefault(node.ino, trio.Lock())
    try:
        async with lock:
            if node.upper or node.index is not None:
                return  # another request copied it meanwhile
            with _CopyJob(ovl, node, parent, name) as job:
                if job.slow:
                    await trio.to_thread.run_sync(job.copy_data)
                    if node.upper or node.index is not None:
                        # a change that copies up at once (a setattr: the writeback cache
                        # sends one for the times) came meanwhile: its copy is the file now
                        # (renaming this one over it would lose what was written to it)
                        return
                else:
                    job.copy_data()
                job.finish()
    finally:
        if not lock.statistics().tasks_waiting:
            ovl.copy_locks.pop(node.ino, None)


def copy_data(src: int, dst: int, size: int) -> None:
    """copy_file_range (reflink or in-kernel copy where possible), read/write as fallback."""
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src, dst, min(_COPY_CHUNK, size - offset), offset, offset)
            if n == 0:
                break
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    while True:
        buf = os.pread(src, 1 << 20, offset)
        if not buf:
            break
        os.pwrite(dst, buf, offset)
        offset += len(buf)


def copy_metadata(ovl: Overlay, src_dir: int, src_name: bytes, dst_dir: int, dst_name: bytes,
                  st: os.stat_result, ino: int, layer: int) -> None:
    """Owner, xattrs, the saved inode number, mode, then times (last: the others touch ctime).

    With ``xattr_permissions`` (override.py) a file's or directory's owner and mode, real or
    from its layer's override, go into the upper's override xattr instead."""
    dst_path = fmt.proc_path(dst_dir, dst_name)
    overrides = ovl.overrides
    shown = None
    if overrides.active and override.applies(st.st_mode):
        src_path = fmt.proc_path(src_dir, src_name)
        shown = overrides.read(layer, src_path, False) or \
            (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    else:
        try:
            os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        except PermissionError:
            pass  # an unprivileged daemon owns what it creates, as fuse-overlayfs does
    copy_xattrs(fmt.proc_path(src_dir, src_name), dst_path, ovl.prefix,
                skip=override.NAMES if overrides.active else ())
    _set_private(ovl, dst_dir, dst_name, fmt.INO_XATTR, b"%d" % ino)
    if shown is not None:
        overrides.write(dst_path, False, *shown)
        os.chmod(dst_name, overrides.backing_mode(shown[2]), dir_fd=dst_dir)
    elif not stat.S_ISLNK(st.st_mode):
        os.chmod(dst_name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
    os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def _set_private(ovl: Overlay, dirfd: int, name: bytes, key: bytes, value: bytes) -> None:
    try:
        fmt.set_overlay_xattr(dirfd, name, ovl.prefix, key, value)
    except OSError as e:  # user.* xattrs exist only on files and dirs
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise


def mark_impure(ovl: Overlay, udir: int) -> None:
    """Tell the kernel this upper dir holds copied-up or moved entries (``impure``): it then
    looks up their origin for inode numbers in readdir, as it does for its own."""
    if fmt.get_overlay_xattr(udir, b"", b"impure", ovl.prefix) is None:
        _set_private(ovl, udir, b"", b"impure", b"y")


def copy_xattrs(src_path: bytes, dst_path: bytes, prefix: bytes,
                skip: tuple[bytes, ...] = ()) -> None:
    try:
        names = os.listxattr(src_path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EPERM):
            return
        raise
    for attr in names:
        battr = attr.encode() if isinstance(attr, str) else attr
        if fmt.is_private_xattr(battr, prefix) or battr in skip:
            continue
        try:
            value = os.getxattr(src_path, battr, follow_symlinks=False)
            os.setxattr(dst_path, battr, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENODATA):
                raise
            log.debug("xattr %r not copied up: %s", battr, e)


def _remove_temp(work: int, tmp: bytes) -> None:
    try:
        os.unlink(tmp, dir_fd=work)
    except IsADirectoryError:
        os.rmdir(tmp, dir_fd=work)
    except FileNotFoundError:
        pass


def ensure_upper_dir(ovl: Overlay, node: Node) -> int:
    """The upper dir fd of directory ``node``, copying it up first (for namespace changes)."""
    if not node.is_dir:
        raise pyfuse3.FUSEError(errno.ENOTDIR)
    copy_up(ovl, node)
    return ovl.upper_dirfd(node)
