"""Merged directory listings (readdir.c): the union of the layers, markers never shown.

A listing is read once per open directory (and again on rewind), so offsets stay stable while
the directory is open.  Every entry is resolved the way ``lookup`` would, so ``d_type`` and
inode numbers agree with ``stat`` by construction.  Stock pyfuse3 always asks READDIRPLUS:
each entry's attributes go with it and the kernel takes a lookup reference on it (counted
here, most of a cold listing's cost).  With ``-o readdirplus_auto`` the patched binding lets
the kernel choose (tools/pyfuse3/readdir-plain.patch): it asks attributes for the first part
of a listing and where lookups in the directory follow, and plain READDIR elsewhere, whose
entries carry only the number and the type and cost no bookkeeping (``ls``, ``find -name``,
shell globs).  Off by default: a walk that lists a whole big directory before it stats each
entry (find, ls -l, du) would then send a LOOKUP per entry, which READDIRPLUS spares.
"""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from .. import format as fmt
from .attrs import entry_attributes, getattr_node
from .inodes import Node
from .layers import openat2_beneath
from .namei import resolve
from .overlay import Overlay


def merged_names(ovl: Overlay, node: Node) -> list[bytes]:
    """Names visible in directory ``node``, upper first then each lower, deduplicated."""
    sources: list[tuple[int, bytes]] = []
    if node.upper:
        sources.append((0, node.upath()))
    if not node.opaque:
        sources.extend(node.lower)
    seen: set[bytes] = set()
    hidden: set[bytes] = set()
    names: list[bytes] = []
    for layer, path in sources:
        try:
            fd = openat2_beneath(ovl.layers[layer].root_fd, path or b".",
                                 os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            xattr_whiteouts = fmt.get_overlay_xattr(fd, b"", b"opaque", ovl.prefix) == b"x"
            here: set[bytes] = set()
            with os.scandir(fd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    here.add(name)
                    if name in seen or name in hidden:
                        continue
                    if name.startswith(fmt.WH_PREFIX):
                        if name != fmt.OPAQUE_MARKER:
                            hidden.add(name[len(fmt.WH_PREFIX):])
                        continue
                    if _is_whiteout_entry(fd, name, entry, xattr_whiteouts, ovl.prefix):
                        hidden.add(name)
                        continue
                    seen.add(name)
                    names.append(name)
            if layer != 0 or ovl.upper is None:
                ovl.remember_lower_names(layer, path, frozenset(here))
        finally:
            os.close(fd)
    return names


def _is_whiteout_entry(fd: int, name: bytes, entry: os.DirEntry, xattr_whiteouts: bool,
                       prefix: bytes) -> bool:
    if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
        return False
    if entry.is_file(follow_symlinks=False):
        if not xattr_whiteouts:
            return False
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        return fmt.is_xattr_whiteout(fd, name, st, prefix)
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    return fmt.is_whiteout_stat(st)


def is_empty(ovl: Overlay, node: Node) -> bool:
    """rmdir's question, answered on the merged view: whiteouts and markers don't count."""
    return not merged_names(ovl, node)


class DirHandle:
    """One open directory: the listing taken at open (or rewind), so offsets stay stable.

    ``fd`` (O_PATH) holds the backing directory while it is open: removed, it still answers
    fstat, and its inode number cannot be reused for another entry meanwhile (see
    InodeTable._reused)."""

    __slots__ = ("node", "names", "fd")

    def __init__(self, node: Node, fd: int) -> None:
        self.node = node
        self.names: list[bytes] | None = None
        self.fd = fd


def open_dir(ovl: Overlay, node: Node) -> DirHandle:
    check_dir(node)
    dirfd, name = ovl.location(node)
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=dirfd) if name else os.open(".", flags, dir_fd=dirfd)
    handle = DirHandle(node, fd)
    node.open_count += 1
    ovl.handles_by_ino.setdefault(node.ino, []).append(handle)
    return handle


def release_dir(ovl: Overlay, handle: DirHandle) -> None:
    os.close(handle.fd)
    node = handle.node
    node.open_count -= 1
    ovl.forget_handle(handle)
    ovl.table.maybe_drop(node)


def readdir(ovl: Overlay, handle: DirHandle, start_id: int, token: pyfuse3.ReaddirToken) -> None:
    node = handle.node
    if handle.names is None or start_id == 0:
        names = ovl.cached_listing(node)
        if names is None:
            names = [b".", b".."] + merged_names(ovl, node)
            ovl.cache_listing(node, names)
        handle.names = names
    names = handle.names
    if start_id >= len(names) and handle.fd < 0:
        # zero-message dirs (a handle without fd): this empty reply completes the kernel's
        # cached copy (FOPEN_CACHE_DIR); ours is only needed again if it drops that one
        ovl.listing_sent(node)
        return
    if not getattr(token, "plus", True):
        _reply_plain(ovl, node, names, start_id, token)
        return
    for i in range(start_id, len(names)):
        name = names[i]
        if name == b"." or name == b"..":
            # the kernel takes no lookup reference for these two
            attr = getattr_node(ovl, _dot_target(node, name))
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            continue
        known = ovl.table.hot_child(node, name)
        if known is not None and known.st is not None:
            # the daemon's own record: nothing changed it since it was read
            if not pyfuse3.readdir_reply(token, name, entry_attributes(ovl, known, known.st), i + 1):
                return
            known.lookups += 1
            continue
        try:
            found = resolve(ovl, node, name)
        except pyfuse3.FUSEError:
            attr = _unresolvable(ovl, node, name)
            if attr is not None and not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            continue
        if found is None:
            continue
        fresh, st = found
        if ovl.table.stays_cold(node, name, fresh):
            # a plain file: counted without a Node (inodes.ColdChildren), once it is sent
            if not pyfuse3.readdir_reply(token, name, entry_attributes(ovl, fresh, st), i + 1):
                return
            ovl.table.count_cold(node, name, fresh)
            continue
        # bound before the reply: the entry must carry the generation the node id gets
        bound = ovl.table.bind(node, name, fresh)
        if not pyfuse3.readdir_reply(token, name, entry_attributes(ovl, bound, st), i + 1):
            ovl.table.maybe_drop(bound)  # not sent: nobody holds a node new to the table
            return
        bound.lookups += 1


def _dot_target(node: Node, name: bytes) -> Node:
    """The directory "." or ".." of ``node`` names (the root is its own parent)."""
    return node if name == b"." else node.parent or node


def _reply_plain(ovl: Overlay, node: Node, names: list[bytes], start_id: int,
                 token: pyfuse3.ReaddirToken) -> None:
    """A plain READDIR: each entry's inode number and type, the ones its lookup gives.  The
    kernel keeps no inode for these entries, so nothing is counted and no node is made."""
    attr = pyfuse3.EntryAttributes()
    for i in range(start_id, len(names)):
        name = names[i]
        if name == b"." or name == b"..":
            target = _dot_target(node, name)
            attr.st_ino, attr.st_mode = target.ino, target.kind
        else:
            known = ovl.table.hot_child(node, name)
            if known is not None:
                attr.st_ino, attr.st_mode = known.ino, known.kind
            else:
                try:
                    found = resolve(ovl, node, name)
                except pyfuse3.FUSEError:
                    shown = _unresolvable(ovl, node, name)
                    if shown is None:
                        continue
                    attr.st_ino, attr.st_mode = shown.st_ino, shown.st_mode
                else:
                    if found is None:
                        continue
                    attr.st_ino, attr.st_mode = found[0].ino, found[1].st_mode
        if not pyfuse3.readdir_reply(token, name, attr, i + 1):
            return


def _unresolvable(ovl: Overlay, node: Node, name: bytes) -> pyfuse3.EntryAttributes | None:
    """An entry the kernel lists but whose lookup fails (a redirect it refuses): listed with
    the attributes of its topmost entry and no caching, so every use looks it up again and
    gets the lookup's error.  No node is kept: nothing can be done through it."""
    places = ([(0, node.upath())] if node.upper else []) + ([] if node.opaque else node.lower)
    for layer, path in places:
        try:
            st = os.stat(name, dir_fd=ovl.dirfds.get(layer, path), follow_symlinks=False)
        except OSError:
            continue
        attr = entry_attributes(ovl, Node(ovl.encode_ino(layer, st.st_ino),
                                          stat.S_IFMT(st.st_mode)), st)
        attr.entry_timeout = attr.attr_timeout = 0
        return attr
    return None


def check_dir(node: Node) -> None:
    if not stat.S_ISDIR(node.kind):
        raise pyfuse3.FUSEError(errno.ENOTDIR)
