"""The hard-link index: one inode, many names, before and after copy-up (the kernel's index=on).

When a file with several lower names is copied up, the copy is also linked into
``work/index/<hex of its origin>``, exactly where the kernel's overlayfs keeps it.  The other
lower names find it there, so every name shows the same data and inode, with this daemon or
with the kernel mounting the same upper and work dir.  The ``nlink`` xattr says how many names
the inode has in the merged tree, in the kernel's form ``U<+-n>``: relative to the link count of
the upper inode, which counts the index entry and the copied-up names but not the lower ones.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3

from .. import format as fmt
from ..errors import OverlayfuseError
from . import origin
from .inodes import Node
from .overlay import Overlay

NLINK_XATTR = b"nlink"
ORIGIN_XATTR = b"origin"

log = logging.getLogger(__name__)


def lookup(ovl: Overlay, name: bytes, real: os.stat_result | None = None,
           kind: int | None = None) -> os.stat_result | None:
    """The index entry ``name``; with ``real``, only if it is that same file.  With ``kind``
    (the file type of the lower origin), an entry of another type, or a whiteout, is EIO: the
    kernel's "bad index found"."""
    if ovl.index_fd < 0:
        return None
    try:
        st = os.stat(name, dir_fd=ovl.index_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if real is not None and (st.st_ino, st.st_dev) != (real.st_ino, real.st_dev):
        return None
    if kind is not None and (stat.S_IFMT(st.st_mode) != kind or fmt.is_whiteout_stat(st)):
        log.warning("bad index entry index/%r: type %o, its origin's %o", name,
                    stat.S_IFMT(st.st_mode), kind)
        raise pyfuse3.FUSEError(errno.EIO)
    return st


def verify(ovl: Overlay) -> None:
    """Check every index entry at mount, as the kernel's overlayfs does with ``index=on``.

    Leftover temp names (``#...``) are removed; a name that is no file handle (EINVAL) or a
    file without an origin (ENODATA) refuses the mount as the kernel does, since serving
    such an index could show anyone's file under a lower name; a file whose origin is not
    its name is stale and removed, as the kernel removes it.  Directories (the kernel's
    nfs_export index) and whiteouts are kept unread.  Only the kernel's own namespace
    (trusted.*) is judged by origin: an unprivileged daemon cannot read the kernel's."""
    fd = ovl.index_fd
    if fd < 0:
        return
    judge_origin = ovl.prefix == fmt.default_prefix(userxattr=False) and os.geteuid() == 0
    for name in [os.fsencode(n) for n in os.listdir(fd)]:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if name.startswith(b"#"):
            _remove(fd, name, st)
            continue
        handle = _handle(name)
        where = os.path.join(ovl.spec.workdir or "", "index", os.fsdecode(name))
        if handle is None:
            raise OverlayfuseError(f"invalid index entry {where} (EINVAL, as the kernel "
                                   f"refuses it): remove it or the index dir")
        if stat.S_ISDIR(st.st_mode) or fmt.is_whiteout_stat(st) or not judge_origin:
            continue
        value = fmt.get_overlay_xattr(fd, name, ORIGIN_XATTR, ovl.prefix)
        if value is None:
            raise OverlayfuseError(f"index entry {where} has no origin (ENODATA, as the "
                                   f"kernel refuses it): remove it or the index dir")
        if value != handle:
            log.warning("stale index entry %s (its origin is another file): removed", where)
            os.unlink(name, dir_fd=fd)


def _handle(name: bytes) -> bytes | None:
    """The origin a well-formed index name stands for, else None."""
    try:
        value = bytes.fromhex(name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if origin.decode(value) is not None else None


def _remove(dirfd: int, name: bytes, st: os.stat_result) -> None:
    """A leftover of an interrupted index change: gone, never followed."""
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=dirfd)
    try:
        for child in [os.fsencode(n) for n in os.listdir(sub)]:
            _remove(sub, child, os.stat(child, dir_fd=sub, follow_symlinks=False))
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dirfd)


def add(ovl: Overlay, work_name: bytes, node: Node, index_name: bytes) -> None:
    """Link a finished copy (in work/) into the index; the caller sets its link count once
    the copy has its final names (``set_nlink``)."""
    ovl.record.note(fmt.INDEX)
    try:
        os.unlink(index_name, dir_fd=ovl.index_fd)  # stale: from a mount over other lowers
    except FileNotFoundError:
        pass
    os.link(work_name, index_name, src_dir_fd=ovl.work_fd, dst_dir_fd=ovl.index_fd,
            follow_symlinks=False)
    node.index = index_name


def nlink(ovl: Overlay, node: Node) -> int | None:
    """The merged link count of an indexed inode."""
    value = fmt.get_overlay_xattr(ovl.index_fd, node.index, NLINK_XATTR, ovl.prefix)
    if value is None or value[:1] != b"U":
        return None
    try:
        real = os.stat(node.index, dir_fd=ovl.index_fd, follow_symlinks=False).st_nlink
        return max(real + int(value[1:]), 0)
    except (OSError, ValueError):
        return None


def set_nlink(ovl: Overlay, node: Node, merged: int) -> None:
    real = os.stat(node.index, dir_fd=ovl.index_fd, follow_symlinks=False).st_nlink
    fmt.set_overlay_xattr(ovl.index_fd, node.index, ovl.prefix, NLINK_XATTR,
                          b"U%+d" % (max(merged, 0) - real))


class Counting:
    """Keep the merged link count right across a change of names: read it before, write
    ``before + delta`` after (the change may also alter the upper inode's own count)."""

    def __init__(self, ovl: Overlay, node: Node, delta: int) -> None:
        self.ovl, self.node, self.delta = ovl, node, delta
        self.before: int | None = None

    def __enter__(self) -> "Counting":
        if self.node.index is not None:
            self.before = nlink(self.ovl, self.node)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and self.node.index is not None:
            if self.before is not None:
                set_nlink(self.ovl, self.node, self.before + self.delta)
            self.ovl.changed(self.node)
