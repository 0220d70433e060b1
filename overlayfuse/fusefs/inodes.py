"""The inode table: FUSE node ids <-> overlay nodes, with the kernel's lookup counting.

pyfuse3 uses ``st_ino`` as the FUSE node id, so a node's id *is* the inode number processes
see.  It is derived from the real inode of the entry that first gave the node its identity
(see ``encode``), so it is the same in ``stat`` and ``readdir``, across remounts, and (through
the ``ovf.ino`` xattr written at copy-up) across copy-up.  Two names of one hard-linked file
resolve to one node, as the kernel's overlayfs with ``index=on`` shows them.
"""
from __future__ import annotations

import errno
import stat
from collections import OrderedDict

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
STAT_CACHE_SIZE = 65536
_stats: OrderedDict = OrderedDict()  # ino -> os.stat_result, least recently used first


class Node:
    """One overlay inode as the kernel knows it.

    ``aliases`` are the (parent node, name) pairs that reach it, newest last; the first one is
    used to find its upper path.  ``lower`` lists where it lives in the lower layers: for a
    directory the whole merge stack (top first), for anything else the single visible entry.
    Lower paths stay valid when an ancestor is renamed (the lowers never change), which is why
    they are stored whole while the upper path is derived from the aliases.
    """

    __slots__ = ("ino", "kind", "aliases", "lookups", "upper", "lower", "opaque", "index",
                 "open_count", "nlink_override")

    def __init__(self, ino: int, kind: int) -> None:
        self.ino = ino
        self.kind = kind
        self.aliases: list[tuple[Node, bytes]] = []
        self.lookups = 0
        self.upper = False
        self.lower: list[tuple[int, bytes]] = []
        self.opaque = False
        self.index: bytes | None = None  # name in the hard-link index holding the data
        self.open_count = 0
        self.nlink_override: int | None = None

    @property
    def st(self):
        """The last stat of the defining entry, if still cached; readdir answers from it
        (see Overlay.changed).  Kept in one bounded table, not on the node: a stat result costs
        more memory than the rest of a node, and a walk of a huge tree keeps a node per entry."""
        st = _stats.get(self.ino)
        if st is not None:
            _stats.move_to_end(self.ino)
        return st

    @st.setter
    def st(self, value) -> None:
        if value is None:
            _stats.pop(self.ino, None)
            return
        _stats[self.ino] = value
        _stats.move_to_end(self.ino)
        if len(_stats) > STAT_CACHE_SIZE:
            _stats.popitem(last=False)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        """A dir whose listing comes from more than one layer (the kernel reports nlink 1)."""
        return self.is_dir and (len(self.lower) + (1 if self.upper else 0)) > 1

    def upath(self) -> bytes:
        """The path of this node in the upper layer (the merged tree's own path)."""
        names = []
        node = self
        while node.ino != ROOT:
            if not node.aliases:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node, name = node.aliases[0]
            names.append(name)
        return b"/".join(reversed(names))

    def parent_and_name(self) -> tuple["Node", bytes]:
        if not self.aliases:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.aliases[0]

    def add_alias(self, parent: "Node", name: bytes) -> None:
        alias = (parent, name)
        if alias in self.aliases:
            return
        self.aliases.append(alias)

    def drop_alias(self, parent: "Node", name: bytes) -> None:
        try:
            self.aliases.remove((parent, name))
        except ValueError:
            pass


class InodeTable:
    """Node ids known to the kernel; a node lives while the kernel or an open file holds it."""

    def __init__(self, root: Node) -> None:
        root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT: root}
        # name -> node for entries the kernel holds, so renames and unlinks can fix aliases
        self._children: dict[tuple[int, bytes], Node] = {}
        self.root = root

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def find(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def child(self, parent: Node, name: bytes) -> Node | None:
        return self._children.get((parent.ino, name))

    def bind(self, parent: Node, name: bytes, fresh: Node) -> Node:
        """Record a lookup result: reuse the known node of that inode, refreshed; count it."""
        node = self._nodes.get(fresh.ino)
        if node is None or node.kind != fresh.kind:
            node = fresh
            self._nodes[node.ino] = node
        else:
            node.upper, node.lower, node.opaque, node.index, node.st = (
                fresh.upper, fresh.lower, fresh.opaque, fresh.index, fresh.st)
            node.nlink_override = fresh.nlink_override
        old = self._children.get((parent.ino, name))
        if old is not None and old is not node:
            old.drop_alias(parent, name)
        node.add_alias(parent, name)
        self._children[(parent.ino, name)] = node
        return node

    def unbind(self, parent: Node, name: bytes) -> Node | None:
        """The name is gone from the merged tree (unlink, rmdir, rename source)."""
        node = self._children.pop((parent.ino, name), None)
        if node is not None:
            node.drop_alias(parent, name)
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Free a node nobody refers to any more: memory stays bounded on huge trees."""
        if node.lookups > 0 or node.open_count > 0 or node.ino == ROOT:
            return
        if self._nodes.get(node.ino) is node:
            del self._nodes[node.ino]
            node.st = None
        for parent, name in node.aliases:
            if self._children.get((parent.ino, name)) is node:
                del self._children[(parent.ino, name)]
        node.aliases.clear()
