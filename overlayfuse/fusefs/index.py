"""The hard-link index: one inode, many names, before and after copy-up (the kernel's index=on).

When a file with several lower names is copied up, the copy is also linked into
``work/ovf-index/<overlay ino>``.  The other lower names find it there, so every name shows
the same data and inode.  The index file carries ``ovf.nlink``: how many names the inode has
in the merged tree, which neither the upper nor the lower link count can tell alone.
"""
from __future__ import annotations

import os

from .. import format as fmt
from .inodes import Node
from .overlay import Overlay

NLINK_XATTR = b"ovf.nlink"


def name_of(node: Node) -> bytes:
    return b"%d" % node.ino


def lookup(ovl: Overlay, ino: int, real: os.stat_result | None = None) -> os.stat_result | None:
    """The index entry for overlay inode ``ino``; with ``real``, only if it is that same file."""
    if ovl.index_fd < 0:
        return None
    try:
        st = os.stat(b"%d" % ino, dir_fd=ovl.index_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if real is not None and (st.st_ino, st.st_dev) != (real.st_ino, real.st_dev):
        return None
    return st


def add(ovl: Overlay, work_name: bytes, node: Node, names: int) -> None:
    """Link a finished copy (in work/) into the index, recording its number of names."""
    fmt.set_overlay_xattr(ovl.work_fd, work_name, ovl.prefix, NLINK_XATTR, b"%d" % names)
    index_name = name_of(node)
    try:
        os.unlink(index_name, dir_fd=ovl.index_fd)  # stale: from a mount over other lowers
    except FileNotFoundError:
        pass
    os.link(work_name, index_name, src_dir_fd=ovl.work_fd, dst_dir_fd=ovl.index_fd,
            follow_symlinks=False)
    node.index = index_name


def nlink(ovl: Overlay, node: Node) -> int | None:
    value = fmt.get_overlay_xattr(ovl.index_fd, node.index, NLINK_XATTR)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def adjust(ovl: Overlay, node: Node, delta: int) -> None:
    """A name of an indexed inode was added or removed through the overlay."""
    if node.index is None:
        return
    ovl.changed(node)
    count = nlink(ovl, node)
    if count is None:
        return
    fmt.set_overlay_xattr(ovl.index_fd, node.index, ovl.prefix, NLINK_XATTR,
                          b"%d" % max(count + delta, 0))
