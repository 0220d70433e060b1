"""File handles (the kernel's FUSE export support): find a node the kernel forgot again.

A FUSE file handle carries only the node id and its generation.  While the kernel still caches
the inode it needs nothing from us; once it evicted it, ``open_by_handle_at`` sends
LOOKUP(node id, "."), and for a directory it reconnects through LOOKUP(node id, "..").  The
inode table keeps the last (parent, name) of the nodes it forgot (bounded, see
``inodes.GONE_SIZE``); here the chain of parents is walked back down by name and the entry is
accepted only if it still is the same inode.  A file deleted, or renamed while forgotten, gives
ESTALE, as the kernel's overlayfs with ``nfs_export=on`` does for a deleted file.  libfuse 3.14
cannot tell the kernel not to offer handles (FUSE_NO_EXPORT_SUPPORT needs libfuse 3.17), so
handles are made to work rather than withdrawn.  The names are kept across a remount too
(``save_names``/``load_names``), as the kernel's handles outlive a remount.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct

import pyfuse3

from .inodes import GONE_SIZE, Node
from .namei import resolve
from .overlay import Overlay

log = logging.getLogger(__name__)
MAX_DEPTH = 4096  # a parent chain longer than any real path: a loop in stale records


def revive(ovl: Overlay, ino: int) -> Node:
    """The node of ``ino``, from the table or found again by one of its remembered names;
    ESTALE if it is gone.  The node returned is not counted as looked up (the caller counts it)."""
    table = ovl.table
    node = table.find(ino)
    if node is not None:
        return node
    record = table.recall(ino)
    if record is None:
        raise pyfuse3.FUSEError(errno.ESTALE)
    generation, names = record
    for parent_ino, name in names:  # a hard-linked file: the first name may be unlinked
        found = _find_by_name(ovl, parent_ino, name, ino, generation)
        if found is not None:
            return found
    raise pyfuse3.FUSEError(errno.ESTALE)


def _find_by_name(ovl: Overlay, parent_ino: int, name: bytes, ino: int,
                  generation: int) -> Node | None:
    """``name`` in the dir ``parent_ino`` (itself found again through its parents' last
    names), bound as ``ino`` if it still is that inode; None if it is not."""
    table = ovl.table
    chain: list[tuple[int, bytes, int]] = [(ino, name, generation)]
    want = parent_ino
    node = table.find(want)
    while node is None:  # directories have one name each: the chain up is a single path
        record = table.recall(want)
        if record is None or not record[1] or len(chain) >= MAX_DEPTH:
            return None
        chain.append((want, record[1][0][1], record[0]))
        want = record[1][0][0]
        node = table.find(want)
    for child_ino, child_name, child_generation in reversed(chain):
        found = resolve(ovl, node, child_name) if node.is_dir else None
        if found is None or found[0].ino != child_ino:
            table.maybe_drop(node)  # parents brought back for nothing go again
            return None
        table.hold_as_parent(node)
        node = table.bind(node, child_name, found[0])
        table.restore_generation(node, child_generation)
    return node


# The last names survive a remount in the work dir (beside work/ and index/, which the kernel's
# overlay owns; it leaves other entries there alone): node ids are derived from the backing
# inodes, so they are the same on the next mount and only the way back to them must be kept.
NAMES_FILE = "overlayfuse-handles"
_RECORD = struct.Struct("<QQIH")  # node id, parent id, generation, name length; then the name


def load_names(ovl: Overlay) -> None:
    """Read the previous mount's last names (a missing or damaged file is no error: a name
    that leads elsewhere is refused by ``revive`` anyway)."""
    if ovl.spec.workdir is None:
        return
    try:
        fd = os.open(os.path.join(ovl.spec.workdir, NAMES_FILE),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        data = f.read(GONE_SIZE * (_RECORD.size + 255))
    records, pos = [], 0
    while pos + _RECORD.size <= len(data):
        ino, parent, generation, size = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        name = data[pos:pos + size]
        pos += size
        if len(name) != size or not name or b"/" in name:
            break
        records.append((ino, parent, name, generation))
    ovl.table.restore_names(records)


def save_names(ovl: Overlay) -> None:
    """Write the last names for the next mount (atomically: a temp file renamed over)."""
    if ovl.spec.workdir is None or ovl.spec.readonly:
        return
    path = os.path.join(ovl.spec.workdir, NAMES_FILE)
    tmp = f"{path}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(_RECORD.pack(ino, parent, generation, len(name)) + name
                             for ino, parent, name, generation in
                             ovl.table.last_names(GONE_SIZE)))
        os.rename(tmp, path)
    except OSError as e:
        log.warning("file handles will not survive the remount: %s", e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
