"""A map from 64-bit node ids to small ints, in two flat arrays.

The inode table keeps one entry per cold inode (inodes.ColdChildren): a million on a walked
tree.  A dict would cost an int object for the key (32 bytes), another for a value above 256,
and ~42-100 bytes of table per entry; open addressing over an ``array('Q')`` of keys and an
``array('I')`` of values costs 12 bytes a slot, 20-40 per entry at the load kept here.
"""
from __future__ import annotations

from array import array

_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: the high bits of ino * this spread well
_MASK64 = (1 << 64) - 1
_MIN_BITS = 10


class NumberMap:
    """Keys are non-zero 64-bit ints, values 32-bit unsigned; linear probing, deletion by
    shifting back the entries behind (no tombstones, so lookups stay short after churn)."""

    __slots__ = ("_keys", "_vals", "_bits", "_used")

    def __init__(self) -> None:
        self._alloc(_MIN_BITS)
        self._used = 0

    def _alloc(self, bits: int) -> None:
        self._bits = bits
        self._keys = array("Q", bytes(8 << bits))
        self._vals = array("I", bytes(4 << bits))

    def __len__(self) -> int:
        return self._used

    def _home(self, key: int) -> int:
        return ((key * _GOLDEN) & _MASK64) >> (64 - self._bits)

    def _slot(self, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it would go."""
        keys, mask = self._keys, (1 << self._bits) - 1
        i = self._home(key)
        while True:
            k = keys[i]
            if k == key or k == 0:
                return i
            i = (i + 1) & mask

    def get(self, key: int, default: int = -1) -> int:
        i = self._slot(key)
        return self._vals[i] if self._keys[i] else default

    def __contains__(self, key: int) -> bool:
        return self._keys[self._slot(key)] != 0

    def __setitem__(self, key: int, value: int) -> None:
        i = self._slot(key)
        if not self._keys[i]:
            if 5 * (self._used + 1) > 3 << self._bits:  # keep the load under 0.6
                self._grow()
                i = self._slot(key)
            self._keys[i] = key
            self._used += 1
        self._vals[i] = value

    def __delitem__(self, key: int) -> None:
        keys, vals, mask = self._keys, self._vals, (1 << self._bits) - 1
        i = self._slot(key)
        if not keys[i]:
            raise KeyError(key)
        j = i
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == 0:
                break
            home = self._home(k)
            # k may move to the hole at i unless its home lies cyclically in (i, j]
            if (home <= i or home > j) if i <= j else (i >= home > j):
                keys[i], vals[i] = k, vals[j]
                i = j
        keys[i] = 0
        self._used -= 1
        if self._bits > _MIN_BITS and 8 * self._used < 1 << self._bits:
            self._rehash(self._bits - 1)  # mostly forgotten: give the memory back

    def _grow(self) -> None:
        self._rehash(self._bits + 1)

    def _rehash(self, bits: int) -> None:
        old_keys, old_vals = self._keys, self._vals
        self._alloc(bits)
        keys, vals, mask = self._keys, self._vals, (1 << bits) - 1
        shift = 64 - bits
        for n, k in enumerate(old_keys):
            if k:
                i = ((k * _GOLDEN) & _MASK64) >> shift
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                vals[i] = old_vals[n]
