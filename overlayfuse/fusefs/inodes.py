"""The inode table: FUSE node ids <-> overlay nodes, with the kernel's lookup counting.

pyfuse3 uses ``st_ino`` as the FUSE node id, so a node's id *is* the inode number processes
see.  It is derived from the real inode of the entry that first gave the node its identity
(see ``encode``), so it is the same in ``stat`` and ``readdir``, across remounts, and (through
the ``ovf.ino`` xattr written at copy-up) across copy-up.  Two names of one hard-linked file
resolve to one node, as the kernel's overlayfs with ``index=on`` shows them.
"""
from __future__ import annotations

import bisect
import errno
import stat
import struct
from array import array
from collections import OrderedDict

import pyfuse3

from .numbermap import NumberMap

ROOT = pyfuse3.ROOT_INODE
STAT_CACHE_SIZE = 65536
GONE_SIZE = 16384  # forgotten node ids whose last name is kept for open_by_handle_at
GONE_NAMES = 4  # names kept per forgotten node: a hard-linked file may have lost the others
_GONE = struct.Struct("<I")  # a forgotten node's generation; then its names, newest first:
_GONE_NAME = struct.Struct("<QH")  # the parent id and the length of one name, then the name
_stats: OrderedDict = OrderedDict()  # ino -> os.stat_result, least recently used first


class Node:
    """One overlay inode as the kernel knows it.

    ``parent``/``name`` is the first (parent node, name) pair that reaches it, the one used to
    find its upper path; a hard-linked file's other names are in ``more_aliases`` (None for
    the rest).  A directory's ``children`` maps the names the kernel holds to their nodes.
    ``lower`` lists where it lives in the lower layers: for a directory the whole merge stack
    (top first), for anything else the single visible entry.  Lower paths stay valid when an
    ancestor is renamed (the lowers never change), which is why they are stored whole while
    the upper path is derived from the parents.  Plain slots, no per-node containers unless
    needed.  A directory's ``cold`` holds the children the kernel looked up but nothing else
    asked about yet, without a node each (see ColdChildren).
    """

    __slots__ = ("ino", "kind", "parent", "name", "more_aliases", "children", "lookups", "upper",
                 "lower", "opaque", "index", "open_count", "nlink_override", "cold")

    def __init__(self, ino: int, kind: int) -> None:
        self.ino = ino
        self.kind = kind
        self.parent: Node | None = None
        self.name = b""
        self.more_aliases: list[tuple[Node, bytes]] | None = None
        self.children: dict[bytes, Node] | None = None
        self.lookups = 0
        self.upper = False
        self.lower: list[tuple[int, bytes]] = _NO_LOWER
        self.opaque = False
        self.index: bytes | None = None  # name in the hard-link index holding the data
        self.open_count = 0
        self.nlink_override: int | None = None
        self.cold: ColdChildren | None = None

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

    @property
    def aliases(self) -> list[tuple["Node", bytes]]:
        """Every (parent, name) that reaches this node, the primary one first."""
        if self.parent is None:
            return []
        first = [(self.parent, self.name)]
        return first + self.more_aliases if self.more_aliases else first

    def upath(self) -> bytes:
        """The path of this node in the upper layer (the merged tree's own path)."""
        names = []
        node = self
        while node.ino != ROOT:
            if node.parent is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            names.append(node.name)
            node = node.parent
        return b"/".join(reversed(names))

    def parent_and_name(self) -> tuple["Node", bytes]:
        if self.parent is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.parent, self.name

    def add_alias(self, parent: "Node", name: bytes) -> None:
        if self.parent is None:
            self.parent, self.name = parent, name
        elif not (self.parent is parent and self.name == name):
            if self.more_aliases is None:
                self.more_aliases = [(parent, name)]
            elif (parent, name) not in self.more_aliases:
                self.more_aliases.append((parent, name))

    def set_alias(self, parent: "Node", name: bytes) -> None:
        """Make (parent, name) the node's only name."""
        self.parent, self.name, self.more_aliases = parent, name, None

    def drop_alias(self, parent: "Node", name: bytes) -> None:
        more = self.more_aliases
        if self.parent is parent and self.name == name:
            if more:
                self.parent, self.name = more.pop(0)
            else:
                self.parent, self.name = None, b""
        elif more:
            try:
                more.remove((parent, name))
            except ValueError:
                pass
        if not more:
            self.more_aliases = None

    def clear_aliases(self) -> None:
        self.parent, self.name, self.more_aliases = None, b"", None


_NO_LOWER: list[tuple[int, bytes]] = []  # shared by the many nodes without a lower entry; never mutated
_IN_PARENT: dict[int, list] = {}


def in_parent_lower(layer: int) -> list:
    """``lower`` of a non-directory found in ``layer`` under its parent's own name: its path
    there is the parent's path in that layer plus its name (Overlay.lower_location), so the
    many files of a huge tree share one list per layer instead of each keeping a path."""
    shared = _IN_PARENT.get(layer)
    if shared is None:
        shared = _IN_PARENT[layer] = [(layer, None)]
    return shared


class ColdChildren:
    """A directory's children that the kernel holds but nobody asked about since: plain
    single-link non-directories whose whole state is (number, kind, upper or which lower layer,
    lookup count, name), so they need no Node.  A walk of a huge tree puts nearly every entry
    here, at about 26 bytes per entry (plus its slot in the table's NumberMap) instead of
    ~660 for a Node with its dict entries and name object.  The first request that needs
    the inode makes a Node of it (InodeTable._promote_at); it stays one until the kernel
    forgets it.

    Entry ``i``: ``inos[8i:8i+8]`` (little-endian, 0 once removed), ``counts[i]``,
    ``meta[i]`` (see ``cold_meta``) and its name at ``offs[i]`` in ``blob``, where every
    name ends with ``/`` (which no name contains), so a name is found with one bytes search.
    From ``INDEXED`` entries on, a directory also indexes its entries by number and by a hash
    of the name (~40 bytes an entry more), so that a lookup, a second listing or an ``rm -rf``
    of a huge directory costs no scan of it per entry.
    """

    __slots__ = ("inos", "counts", "meta", "offs", "blob", "dead", "serial", "by_ino",
                 "by_name", "collided")
    INDEXED = 4096  # below: a scan of at most 32 KiB of numbers, about a microsecond

    def __init__(self) -> None:
        self.serial = -1  # the directory's number in InodeTable._cold_dirs
        self.inos = bytearray()
        self.counts = array("I")
        self.meta = array("I")
        self.offs = array("I")
        self.blob = bytearray(b"/")
        self.dead = 0
        self.by_ino: NumberMap | None = None
        self.by_name: NumberMap | None = None
        self.collided = False  # two names of one hash: a miss in by_name proves nothing

    def __len__(self) -> int:
        return len(self.counts) - self.dead

    def add(self, ino: int, name: bytes, meta: int) -> None:
        i = len(self.counts)
        self.inos += ino.to_bytes(8, "little")
        self.counts.append(1)
        self.meta.append(meta)
        self.offs.append(len(self.blob))
        self.blob += name
        self.blob += b"/"
        if self.by_ino is not None:
            self._index(i, ino, name)
        elif i + 1 >= self.INDEXED:
            self.by_ino, self.by_name = NumberMap(), NumberMap()
            for j in range(i + 1):
                if self.inos[8 * j:8 * j + 8] != _ZERO:
                    self._index(j, self.ino(j), self.name(j))

    def _index(self, i: int, ino: int, name: bytes) -> None:
        self.by_ino[ino] = i
        key = _name_key(name)
        if key in self.by_name:
            self.collided = True
        else:
            self.by_name[key] = i

    def pos(self, ino: int) -> int:
        """Index of ``ino``'s entry, -1 if absent."""
        if self.by_ino is not None:
            return self.by_ino.get(ino)
        key, inos = ino.to_bytes(8, "little"), self.inos
        i = inos.find(key)
        while i > 0 and i % 8:
            i = inos.find(key, i + 1)
        return i // 8 if i >= 0 else -1

    def find_name(self, name: bytes) -> int:
        """Index of the live entry named ``name``, -1 if none."""
        if self.by_name is not None:
            i = self.by_name.get(_name_key(name))
            if i >= 0 and self.name(i) == name:
                return i
            if not self.collided:
                return -1
        blob, key = self.blob, b"/" + name + b"/"
        at = blob.find(key)
        while at >= 0:
            i = bisect.bisect_left(self.offs, at + 1)
            if self.inos[8 * i:8 * i + 8] != _ZERO:
                return i
            at = blob.find(key, at + 1)
        return -1

    def ino(self, i: int) -> int:
        return int.from_bytes(self.inos[8 * i:8 * i + 8], "little")

    def name(self, i: int) -> bytes:
        start = self.offs[i]
        return bytes(self.blob[start:self.blob.index(b"/", start)])

    def remove(self, i: int) -> None:
        if self.by_ino is not None:
            del self.by_ino[self.ino(i)]
            key = _name_key(self.name(i))
            if self.by_name.get(key) == i:
                del self.by_name[key]
        self.inos[8 * i:8 * i + 8] = _ZERO
        self.dead += 1
        if self.dead > 64 and 2 * self.dead > len(self.counts):
            self._compact()

    def _compact(self) -> None:
        """Drop removed entries, so a directory whose children come and go stays small."""
        live = [i for i in range(len(self.counts)) if self.inos[8 * i:8 * i + 8] != _ZERO]
        old = [(self.ino(i), self.counts[i], self.meta[i], self.name(i)) for i in live]
        serial = self.serial
        self.__init__()
        self.serial = serial
        for ino, count, meta, name in old:
            self.add(ino, name, meta)
            self.counts[-1] = count


def _name_key(name: bytes) -> int:
    """A non-zero 64-bit key for a name (this process's string hash)."""
    return hash(name) & 0xFFFFFFFFFFFFFFFF or 1


_ZERO = bytes(8)


def cold_meta(fresh: Node) -> int:
    """The packed state of a fresh lookup result that may stay cold, or -1: the kind's type
    bits, the upper flag, and the lower layer of a file found under its parent's own name."""
    if fresh.kind == stat.S_IFDIR or fresh.index is not None or fresh.ino == ROOT \
            or fresh.nlink_override is not None or fresh.more_aliases is not None \
            or fresh.open_count:
        return -1
    if fresh.upper:
        if fresh.lower is not _NO_LOWER:
            return -1
        return fresh.kind >> 12 | 16
    lower = fresh.lower
    if len(lower) != 1 or _IN_PARENT.get(lower[0][0]) is not lower:
        return -1
    return fresh.kind >> 12 | lower[0][0] << 5


class InodeTable:
    """Node ids known to the kernel; a node lives while the kernel or an open file holds it.

    Most of them, on a big tree, are cold entries (ColdChildren) of their parent directory:
    ``_cold`` maps their number to that directory's serial in ``_cold_dirs``.  Every way to reach an inode (``get``,
    ``find``, ``child``, ``unbind``) turns a cold entry into a Node first, so the rest of the
    daemon only ever sees Nodes.
    """

    def __init__(self, root: Node) -> None:
        root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT: root}
        self._cold = NumberMap()  # node id -> serial of the directory holding it cold
        self._cold_dirs: list[Node | None] = []  # serial -> directory with cold children
        self._free_serials: list[int] = []
        self._generations: dict[int, int] = {}  # node id -> generation, for reused numbers
        # node id -> generation and up to GONE_NAMES (parent node id, name) of nodes the kernel
        # forgot, newest last: a file handle names only the node id (export.py finds it again)
        self._gone: OrderedDict[int, bytes] = OrderedDict()  # packed: _GONE, then its names
        self._scaffold: set[int] = set()  # node ids held only as parents of revived nodes
        self.root = root

    def __len__(self) -> int:
        return len(self._nodes) + len(self._cold)

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            pass
        node = self._promote(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def find(self, ino: int) -> Node | None:
        node = self._nodes.get(ino)
        return node if node is not None else self._promote(ino)

    def holds(self, ino: int) -> bool:
        """Does the kernel (or an open file) still hold this node id?"""
        return ino in self._nodes or ino in self._cold

    def child(self, parent: Node, name: bytes) -> Node | None:
        """The node the kernel holds under ``name`` in ``parent``, so renames and unlinks can
        fix its names."""
        children = parent.children
        node = children.get(name) if children is not None else None
        if node is None and parent.cold is not None:
            i = parent.cold.find_name(name)
            if i >= 0:
                node = self._promote_at(parent, i)
        return node

    @staticmethod
    def hot_child(parent: Node, name: bytes) -> Node | None:
        """Like ``child`` but only a Node already made (readdir's fast path: a cold entry
        costs a lookup there, not a Node)."""
        children = parent.children
        return children.get(name) if children is not None else None

    # -- cold entries ------------------------------------------------------------------------
    def stays_cold(self, parent: Node, name: bytes, fresh: Node) -> bool:
        """May the kernel's lookup of ``name`` -> ``fresh`` be counted as a cold entry: a plain
        file (cold_meta) whose number is new here, or is already the same cold entry?  If so,
        ``fresh`` gets its parent and name, unbound: the reply's attributes are read through
        its location (an override xattr, attrs.stored_override)."""
        meta = cold_meta(fresh)
        if meta < 0 or fresh.ino in self._nodes:
            return False
        where = self._cold_parent(fresh.ino)
        if where is None:
            children = parent.children
            cold = children is None or name not in children
        elif where is not parent:
            return False
        else:
            i = parent.cold.pos(fresh.ino)
            cold = parent.cold.meta[i] == meta and parent.cold.name(i) == name
        if cold:
            fresh.parent, fresh.name = parent, name
        return cold

    def count_cold(self, parent: Node, name: bytes, fresh: Node) -> None:
        """One more kernel lookup of a result ``stays_cold`` accepted."""
        _stats.pop(fresh.ino, None)  # attributes are the kernel's to cache now
        if fresh.ino in self._cold:
            cold = parent.cold
            i = cold.pos(fresh.ino)
            cold.counts[i] += 1
            return
        cold = parent.cold
        if cold is None:
            cold = parent.cold = ColdChildren()
            if self._free_serials:
                cold.serial = self._free_serials.pop()
                self._cold_dirs[cold.serial] = parent
            else:
                cold.serial = len(self._cold_dirs)
                self._cold_dirs.append(parent)
        cold.add(fresh.ino, name, cold_meta(fresh))
        self._cold[fresh.ino] = cold.serial

    def _cold_parent(self, ino: int) -> Node | None:
        serial = self._cold.get(ino)
        return self._cold_dirs[serial] if serial >= 0 else None

    def _promote(self, ino: int) -> Node | None:
        parent = self._cold_parent(ino)
        if parent is None:
            return None
        return self._promote_at(parent, parent.cold.pos(ino))

    def _promote_at(self, parent: Node, i: int) -> Node:
        """Make a Node of cold entry ``i`` of ``parent``, with its name and lookup count."""
        cold = parent.cold
        ino, meta, name = cold.ino(i), cold.meta[i], cold.name(i)
        node = Node(ino, (meta & 15) << 12)
        node.lookups = cold.counts[i]
        if meta & 16:
            node.upper = True
        else:
            node.lower = in_parent_lower(meta >> 5)
        self._drop_cold(parent, i, ino)
        node.parent, node.name = parent, name
        self._nodes[ino] = node
        children = parent.children
        if children is None:
            children = parent.children = {}
        children[name] = node
        return node

    def _drop_cold(self, parent: Node, i: int, ino: int) -> None:
        cold = parent.cold
        cold.remove(i)
        del self._cold[ino]
        if not cold:
            parent.cold = None
            self._cold_dirs[cold.serial] = None
            self._free_serials.append(cold.serial)

    # -- binding -------------------------------------------------------------------------
    def bind(self, parent: Node, name: bytes, fresh: Node) -> Node:
        """Record a lookup result: reuse the known node of that inode, refreshed; count it."""
        if fresh.ino in self._cold:
            self._promote(fresh.ino)
        node = self._nodes.get(fresh.ino)
        if node is None:
            # its record in _gone stays: if this node loses its names before it is forgotten
            # again (a hard link's first name unlinked), the names it had before still lead to it
            node = self._nodes[fresh.ino] = fresh
        elif node is not fresh and self._reused(node, fresh):
            self._succeed(node, fresh)
            node = fresh
        elif node is not fresh:
            node.upper, node.lower, node.opaque, node.index, node.st = (
                fresh.upper, fresh.lower, fresh.opaque, fresh.index, fresh.st)
            node.nlink_override = fresh.nlink_override
        old = self.child(parent, name)
        children = parent.children
        if children is None:
            children = parent.children = {}
        if old is not None and old is not node:
            old.drop_alias(parent, name)
        node.add_alias(parent, name)
        children[name] = node
        return node

    @staticmethod
    def _reused(old: Node, fresh: Node) -> bool:
        """Is ``fresh`` another entry that got the inode number of ``old``, a node the kernel
        still holds?  A backing filesystem reuses the number of a deleted inode at once, and
        the kernel's FORGET for the old one may still be on its way.  A node with a name left,
        or open here (its backing inode then lives on), is the same file."""
        if old.kind != fresh.kind:
            return True
        return old.parent is None and old.open_count == 0 and old.ino != ROOT

    def _succeed(self, old: Node, fresh: Node) -> None:
        """``fresh`` takes the node id over from ``old``.  FORGET names only the node id, so
        the kernel's lookups of both add up on the new node; a new generation tells the
        kernel it is another inode (it retires its old one instead of reusing its cache)."""
        fresh.lookups, old.lookups = old.lookups, 0
        self._generations[fresh.ino] = self._generations.get(old.ino, 0) + 1
        self._nodes[fresh.ino] = fresh
        self._unlink_names(old)

    def generation(self, node: Node) -> int:
        """The generation the kernel knows this node id by (0 unless its number was reused)."""
        return self._generations.get(node.ino, 0) if self._generations else 0

    def unbind(self, parent: Node, name: bytes) -> Node | None:
        """The name is gone from the merged tree (unlink, rmdir, rename source)."""
        self.child(parent, name)  # a cold entry becomes a Node: it may live on, nameless
        children = parent.children
        node = children.pop(name, None) if children is not None else None
        if node is not None:
            node.drop_alias(parent, name)
            self._drop_scaffold(parent)
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            parent = self._cold_parent(ino)
            if parent is not None:
                cold = parent.cold
                i = cold.pos(ino)
                left = cold.counts[i] - count
                if left > 0:
                    cold.counts[i] = left
                else:  # forgotten: its last name stays known, for file handles (export.py)
                    self._remember(ino, [(parent.ino, cold.name(i))],
                                   self._generations.pop(ino, 0))
                    self._drop_cold(parent, i, ino)
                    self._drop_scaffold(parent)
            return
        if ino == ROOT:
            return
        node.lookups -= count
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Free a node nobody refers to any more: memory stays bounded on huge trees."""
        if node.lookups > 0 or node.open_count > 0 or node.ino == ROOT:
            return
        if node.children or node.cold is not None:
            # a dir the kernel forgot while a child it still holds by another name (a hard
            # link elsewhere, held open) has a path through it: kept as that child's parent
            self._scaffold.add(node.ino)
            return
        parents = [parent for parent, _ in node.aliases]
        if self._nodes.get(node.ino) is node:
            del self._nodes[node.ino]
            generation = self._generations.pop(node.ino, 0)
            self._scaffold.discard(node.ino)
            # every name it had: a hard link's first name may be unlinked while it is forgotten
            # (a nameless node keeps the names it was last remembered by)
            if node.parent is not None:
                self._remember(node.ino, [(p.ino, n) for p, n in node.aliases], generation)
            node.st = None
        self._unlink_names(node)
        for parent in parents:  # a parent held only for a revived child goes with it
            self._drop_scaffold(parent)

    def _drop_scaffold(self, parent: Node) -> None:
        if parent.ino in self._scaffold and not parent.children and parent.cold is None:
            self._scaffold.discard(parent.ino)
            self.maybe_drop(parent)

    def _remember(self, ino: int, names: list[tuple[int, bytes]], generation: int) -> None:
        """Keep the names a forgotten node was reached by; names it was known by before and
        does not have now stay behind them (a name that leads elsewhere is refused on revival)."""
        gone = self._gone
        old = gone.get(ino)
        if old is not None:
            names = names + [entry for entry in self._unpack_names(old) if entry not in names]
        gone[ino] = _GONE.pack(generation) + b"".join(
            _GONE_NAME.pack(parent, len(name)) + name for parent, name in names[:GONE_NAMES])
        gone.move_to_end(ino)
        if len(gone) > GONE_SIZE:
            gone.popitem(last=False)

    @staticmethod
    def _unpack_names(packed: bytes) -> list[tuple[int, bytes]]:
        names, pos = [], _GONE.size
        while pos < len(packed):
            parent, size = _GONE_NAME.unpack_from(packed, pos)
            pos += _GONE_NAME.size
            names.append((parent, packed[pos:pos + size]))
            pos += size
        return names

    def last_names(self, limit: int) -> list[tuple[int, int, bytes, int]]:
        """(node id, parent id, name, generation) of the named nodes known now, then of the
        forgotten ones, newest first, at most ``limit``: what a remount needs to find them.
        A node with several names has one record per name."""
        out = []
        for node in self._nodes.values():
            if len(out) >= limit:
                break
            generation = self.generation(node)
            out.extend((node.ino, parent.ino, name, generation) for parent, name in node.aliases)
        for parent in self._cold_dirs:
            cold = parent.cold if parent is not None else None
            for i in range(len(cold.counts)) if cold is not None else ():
                if len(out) >= limit:
                    break
                ino = cold.ino(i)
                if ino:
                    out.append((ino, parent.ino, cold.name(i), self._generations.get(ino, 0)))
        for ino in reversed(self._gone):
            if len(out) >= limit:
                break
            if ino not in self._nodes:
                generation, names = self.recall(ino)
                out.extend((ino, parent, name, generation) for parent, name in names)
        return out[:limit]

    def restore_names(self, records: list[tuple[int, int, bytes, int]]) -> None:
        """Records from ``last_names`` (newest first) of a previous mount, as forgotten nodes."""
        for ino, parent, name, generation in reversed(records[:GONE_SIZE]):
            if ino not in self._nodes:
                self._remember(ino, [(parent, name)], generation)

    def recall(self, ino: int) -> tuple[int, list[tuple[int, bytes]]] | None:
        """How a forgotten node id was last reached: (generation, [(parent node id, name)])."""
        packed = self._gone.get(ino)
        if packed is None:
            return None
        return _GONE.unpack_from(packed)[0], self._unpack_names(packed)

    def hold_as_parent(self, node: Node) -> None:
        """``node`` was brought back only to reach a revived child: the kernel holds no lookup
        of it, so it is dropped with its last child rather than by a FORGET."""
        if node.lookups <= 0:
            self._scaffold.add(node.ino)

    def restore_generation(self, node: Node, generation: int) -> None:
        if generation:
            self._generations[node.ino] = generation

    @staticmethod
    def _unlink_names(node: Node) -> None:
        for parent, name in node.aliases:
            children = parent.children
            if children is not None and children.get(name) is node:
                del children[name]
                if not children:
                    parent.children = None
        node.clear_aliases()
