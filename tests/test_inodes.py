"""The inode table's lookup counting when the backing filesystem reuses an inode number.

A deleted entry's number comes back at once for the next create, while the kernel's FORGET for
the old entry may still be on its way: the node id must then survive that late FORGET (the
mkdir ESTALE of the load test, tests/test_load.py) and carry a new generation.
"""
from __future__ import annotations

import random
import stat

import pyfuse3
import pytest

from overlayfuse.fusefs.inodes import ROOT, ColdChildren, InodeTable, Node, in_parent_lower


def _table() -> InodeTable:
    return InodeTable(Node(ROOT, stat.S_IFDIR))


def _looked_up(table: InodeTable, name: bytes, node: Node) -> Node:
    bound = table.bind(table.root, name, node)
    bound.lookups += 1
    return bound


@pytest.mark.parametrize("kind", [stat.S_IFDIR, stat.S_IFREG], ids=["dir", "file"])
def test_reused_number_survives_the_old_entrys_late_forget(kind: int) -> None:
    table = _table()
    old = _looked_up(table, b"gone", Node(42, stat.S_IFREG))
    table.unbind(table.root, b"gone")  # unlinked; the kernel has not sent FORGET yet
    new = _looked_up(table, b"made", Node(42, kind))
    assert new is not old and table.get(42) is new
    assert table.generation(new) == 1
    table.forget(42, 1)  # the old entry's FORGET, late
    assert table.get(42) is new
    table.forget(42, 1)
    with pytest.raises(pyfuse3.FUSEError):
        table.get(42)
    assert table.generation(new) == 0  # forgotten by the kernel: numbering starts over


def test_a_name_left_or_an_open_file_is_the_same_inode() -> None:
    table = _table()
    linked = _looked_up(table, b"a", Node(7, stat.S_IFREG))
    _looked_up(table, b"b", Node(7, stat.S_IFREG))
    table.unbind(table.root, b"a")
    assert _looked_up(table, b"b", Node(7, stat.S_IFREG)) is linked  # still named b
    opened = _looked_up(table, b"c", Node(8, stat.S_IFREG))
    opened.open_count = 1
    table.unbind(table.root, b"c")  # unlinked while open: its backing inode lives on
    assert _looked_up(table, b"c2", Node(8, stat.S_IFREG)) is opened
    assert table.generation(opened) == 0


def _plain_file(ino: int) -> Node:
    """A lookup result that may stay cold: a single-link file of lower layer 1."""
    node = Node(ino, stat.S_IFREG)
    node.lower = in_parent_lower(1)
    return node


def _counted(table: InodeTable, parent: Node, name: bytes, fresh: Node) -> None:
    assert table.stays_cold(parent, name, fresh)
    table.count_cold(parent, name, fresh)


def test_a_plain_file_is_counted_without_a_node_until_a_request_needs_it() -> None:
    table = _table()
    root = table.root
    for i in range(10):
        _counted(table, root, b"f%d" % i, _plain_file(100 + i))
    _counted(table, root, b"f3", _plain_file(103))  # looked up twice
    assert len(table) == 11 and root.children is None and table.holds(103)
    node = table.get(103)
    assert (node.kind, node.parent, node.name, node.lookups) == (stat.S_IFREG, root, b"f3", 2)
    assert node.lower is in_parent_lower(1) and not node.upper
    assert table.get(103) is node and table.child(root, b"f3") is node
    assert not table.stays_cold(root, b"f3", _plain_file(103))  # a Node now: bound as one
    table.forget(103, 2)
    assert not table.holds(103)
    table.forget(104, 1)
    assert not table.holds(104) and table.find(104) is None
    assert table.child(root, b"f5").ino == 105 and table.find(106).name == b"f6"


def test_other_entries_are_not_cold() -> None:
    table = _table()
    root = table.root
    assert not table.stays_cold(root, b"d", Node(5, stat.S_IFDIR))
    linked = Node(6, stat.S_IFREG)
    linked.lower = [(1, b"x/y")]  # found by a path of its own (a hard link)
    assert not table.stays_cold(root, b"l", linked)
    indexed = _plain_file(7)
    indexed.index = b"00fb"
    assert not table.stays_cold(root, b"i", indexed)
    upper = Node(8, stat.S_IFLNK)
    upper.upper = True
    assert table.stays_cold(root, b"u", upper)
    _counted(table, root, b"u", upper)
    assert table.get(8).upper and table.get(8).kind == stat.S_IFLNK
    _counted(table, root, b"a", _plain_file(9))
    assert not table.stays_cold(root, b"b", _plain_file(9))  # a second name: a hard link


def test_unlinking_a_cold_entry_keeps_the_late_forget_right() -> None:
    table = _table()
    _counted(table, table.root, b"gone", _plain_file(42))
    old = table.unbind(table.root, b"gone")
    assert old is not None and old.parent is None and table.get(42) is old
    new = _looked_up(table, b"made", _plain_file(42))  # the number reused at once
    assert new is not old and table.generation(new) == 1
    table.forget(42, 1)  # the old entry's FORGET
    assert table.get(42) is new


def test_cold_entries_survive_compaction() -> None:
    table = _table()
    root = table.root
    for i in range(300):
        _counted(table, root, b"n%03d" % i, _plain_file(1000 + i))
    for i in range(0, 300, 3):
        table.forget(1000 + i, 1)
    for i in range(1, 300, 3):
        table.get(1000 + i)  # promoted: gone from the cold entries too
    assert root.cold is not None and len(root.cold) == 100
    assert len(root.cold.counts) < 300  # compacted on the way
    for i in range(2, 300, 3):
        assert table.child(root, b"n%03d" % i).ino == 1000 + i
    assert root.cold is None


def test_number_map_against_a_dict() -> None:
    """The cold entries' index (numbermap.py) behaves as a dict through growth, deletes that
    shift entries back, wrap-around and shrinking."""
    import random
    from overlayfuse.fusefs.numbermap import NumberMap
    rnd = random.Random(12)
    m, ref = NumberMap(), {}
    keys = [rnd.getrandbits(64) or 1 for _ in range(3000)] + list(range(2, 3000))
    for step in range(16000):
        k = rnd.choice(keys)
        if rnd.random() < (0.6 if step < 8000 else 0.3):
            m[k] = ref[k] = rnd.getrandbits(32)
        elif k in ref:
            del m[k], ref[k]
        assert m.get(k) == ref.get(k, -1) and (k in m) == (k in ref)
    assert len(m) == len(ref)
    assert all(m.get(k) == v for k, v in ref.items())
    for k in list(ref):
        del m[k]
    assert len(m) == 0 and all(k not in m for k in keys)


def test_cold_children_of_a_huge_dir_are_found_through_their_index() -> None:
    """Past ColdChildren.INDEXED entries, numbers and names are found by index (no scan per
    entry: a second listing of a million-entry dir was quadratic), with removals and
    compactions in between, as without the index."""
    cold, alive = ColdChildren(), {}
    count = ColdChildren.INDEXED * 2
    for n in range(count):
        cold.add(7 * n + 1, b"f%d" % n, 8)
        alive[7 * n + 1] = b"f%d" % n
    assert cold.by_ino is not None
    for ino in random.Random(1).sample(sorted(alive), count * 2 // 3):  # compacts on the way
        i = cold.pos(ino)
        assert cold.ino(i) == ino and cold.find_name(alive[ino]) == i
        cold.remove(i)
        del alive[ino]
    assert len(cold) == len(alive)
    for ino, name in alive.items():
        i = cold.pos(ino)
        assert i >= 0 and cold.ino(i) == ino and cold.find_name(name) == i
    assert cold.pos(5) == -1 and cold.find_name(b"nowhere") == -1
