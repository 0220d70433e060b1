"""File handles (the kernel's FUSE export support): find a node the kernel forgot again.

A FUSE file handle carries only the node id and its generation.  While the kernel still caches
the inode it needs nothing from us; once it evicted it, ``open_by_handle_at`` sends
LOOKUP(node id, "."), and for a directory it reconnects through LOOKUP(node id, "..").  The
inode table keeps the last (parent, name) of the nodes it forgot (bounded, see
``inodes.GONE_SIZE``); here the chain of parents is walked back down by name and the entry is
accepted only if it still is the same inode.  A file deleted, or renamed while forgotten, gives
ESTALE, as the kernel's overlayfs with ``nfs_export=on`` does for a deleted file.  libfuse 3.14
cannot tell the kernel not to offer handles (FUSE_NO_EXPORT_SUPPORT needs libfuse 3.17), so
handles are made to work rather than withdrawn.
"""
from __future__ import annotations

import errno

import pyfuse3

from .inodes import Node
from .namei import resolve
from .overlay import Overlay

MAX_DEPTH = 4096  # a parent chain longer than any real path: a loop in stale records


def revive(ovl: Overlay, ino: int) -> Node:
    """The node of ``ino``, from the table or found again by its remembered name; ESTALE if
    it is gone.  The node returned is not counted as looked up (the caller counts it)."""
    table = ovl.table
    chain: list[tuple[int, bytes, int]] = []
    want = ino
    node = table.find(want)
    while node is None:
        record = table.recall(want)
        if record is None or len(chain) >= MAX_DEPTH:
            raise pyfuse3.FUSEError(errno.ESTALE)
        chain.append((want, record[1], record[2]))
        want = record[0]
        node = table.find(want)
    for child_ino, name, generation in reversed(chain):
        found = resolve(ovl, node, name) if node.is_dir else None
        if found is None or found[0].ino != child_ino:
            table.maybe_drop(node)  # parents brought back for nothing go again
            raise pyfuse3.FUSEError(errno.ESTALE)
        table.hold_as_parent(node)
        node = table.bind(node, name, found[0])
        table.restore_generation(node, generation)
    return node
