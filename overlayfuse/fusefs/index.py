"""The hard-link index: one inode, many names, before and after copy-up (the kernel's index=on).

When a file with several lower names is copied up, the copy is also linked into
``work/index/<hex of its origin>``, exactly where the kernel's overlayfs keeps it.  The other
lower names find it there, so every name shows the same data and inode, with this daemon or
with the kernel mounting the same upper and work dir.  The ``nlink`` xattr says how many names
the inode has in the merged tree, in the kernel's form ``U<+-n>``: relative to the link count of
the upper inode, which counts the index entry and the copied-up names but not the lower ones.
"""
from __future__ import annotations

import os

from .. import format as fmt
from .inodes import Node
from .overlay import Overlay

NLINK_XATTR = b"nlink"


def lookup(ovl: Overlay, name: bytes, real: os.stat_result | None = None) -> os.stat_result | None:
    """The index entry ``name``; with ``real``, only if it is that same file."""
    if ovl.index_fd < 0:
        return None
    try:
        st = os.stat(name, dir_fd=ovl.index_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if real is not None and (st.st_ino, st.st_dev) != (real.st_ino, real.st_dev):
        return None
    return st


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
