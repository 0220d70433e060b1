"""The inode table's lookup counting when the backing filesystem reuses an inode number.

A deleted entry's number comes back at once for the next create, while the kernel's FORGET for
the old entry may still be on its way: the node id must then survive that late FORGET (the
mkdir ESTALE of the load test, tests/test_load.py) and carry a new generation.
"""
from __future__ import annotations

import stat

import pyfuse3
import pytest

from overlayfuse.fusefs.inodes import ROOT, InodeTable, Node


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
