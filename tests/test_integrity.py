"""Data integrity: random reads, writes, truncates and mmap accesses checked against a model.

A file that starts in a lower layer gets random operations through one overlayfuse
mount (with and without mmap); every read must return what a plain bytearray says, and so
must a read-only descriptor opened before the first write copied the file up (the rpm
problem: it has to see the copy, not the stale lower file).  At the end the upper file holds
exactly the model and the lower is untouched.  Each runs without and with the kernel's
writeback cache (``-o writeback=1``: the kernel owns size and times, writes whole pages).
The default suite runs 25,000 operations per variant; OVERLAYFUSE_INTEGRITY_OPS sets the count
(.ci/run: the full 100,000).
"""
from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from mounts import Layers, overlayfuse_mount

pytestmark = pytest.mark.slow

OPS = int(os.environ.get("OVERLAYFUSE_INTEGRITY_OPS", "25000"))
START = 256 << 10
MAX_SIZE = 1 << 20
MAX_IO = 20000


class Checker:
    """One read-write fd and one read-only fd on the merged file, and the model of its bytes."""

    def __init__(self, path: Path, model: bytearray, ro_fd: int, rng: random.Random) -> None:
        self.path, self.model, self.ro, self.rng = path, model, ro_fd, rng
        self.fd = os.open(path, os.O_RDWR)

    def _span(self) -> tuple[int, int]:
        off = self.rng.randrange(0, max(1, len(self.model) + 4096))
        return off, self.rng.randrange(1, MAX_IO)

    def check_read(self, fd: int, what: str) -> None:
        off, n = self._span()
        got = os.pread(fd, n, off)
        assert got == bytes(self.model[off:off + n]), f"{what} at {off}+{n} differs"

    def write(self) -> None:
        off, n = self._span()
        off = min(off, MAX_SIZE - n)
        data = self.rng.randbytes(n)
        assert os.pwrite(self.fd, data, off) == n
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off:off + n] = data

    def truncate(self) -> None:
        size = self.rng.randrange(0, MAX_SIZE)
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def mapped(self, write: bool) -> None:
        size = len(self.model)
        if size == 0:
            return
        off = self.rng.randrange(0, size)
        n = min(self.rng.randrange(1, MAX_IO), size - off)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot) as m:
            if write:
                data = self.rng.randbytes(n)
                m[off:off + n] = data
                self.model[off:off + n] = data
            else:
                assert m[off:off + n] == bytes(self.model[off:off + n]), f"mmap at {off}+{n}"

    def reopen(self) -> None:
        self.close()
        self.fd = os.open(self.path, os.O_RDWR)

    def close(self) -> None:
        """Idempotent: also called when the test failed, so that the mount is not busy."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.mark.parametrize("writeback", [False, True], ids=["", "writeback"])
@pytest.mark.parametrize("use_mmap", [False, True], ids=["pread-pwrite", "with-mmap"])
def test_random_io_matches_model(layers: Layers, use_mmap: bool, writeback: bool) -> None:
    rng = random.Random(use_mmap)
    start = rng.randbytes(START)
    lower_file = layers.lowers[0] / "data"
    lower_file.write_bytes(start)
    model = bytearray(start)
    extra = ["writeback=1"] if writeback else []
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt, extra):
        path = layers.mnt / "data"
        ro = os.open(path, os.O_RDONLY)  # before the copy-up
        c = None
        try:
            assert os.pread(ro, 100, 0) == start[:100]
            c = Checker(path, model, ro, rng)
            kinds = ["read", "write", "truncate", "ro_read", "reopen"]
            weights = [30, 30, 3, 10, 1]
            if use_mmap:
                kinds += ["mmap_read", "mmap_write"]
                weights += [12, 12]
            for kind in rng.choices(kinds, weights, k=OPS):
                if kind == "read":
                    c.check_read(c.fd, "read")
                elif kind == "ro_read":
                    c.check_read(ro, "read on the fd opened before the copy-up")
                elif kind == "write":
                    c.write()
                elif kind == "truncate":
                    c.truncate()
                elif kind == "reopen":
                    c.reopen()
                else:
                    c.mapped(kind == "mmap_write")
            c.close()
            assert os.pread(ro, MAX_SIZE + 1, 0) == bytes(model), "the early fd reads stale data"
        finally:
            # nothing of ours may hold the mount when it goes, also after a failure: else its
            # unmount is lazy and the daemon lives on (the harness then says so, see mounts.py)
            if c is not None:
                c.close()
            os.close(ro)
        assert path.read_bytes() == bytes(model)
    assert (layers.upper / "data").read_bytes() == bytes(model)
    assert lower_file.read_bytes() == start, "the lower file changed"
