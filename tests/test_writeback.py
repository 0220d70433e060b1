"""The kernel's writeback cache (``-o writeback=1``): the cases it changes, against the kernel.

With it the kernel keeps written data in its page cache, owns the file's size and times, does
O_APPEND itself and writes back whole pages, reading the rest of a page first.  So the daemon
opens write-only files read-write and drops O_APPEND (file.backing_flags).  Each scenario runs
on the kernel's overlayfs and on overlayfuse with writeback, in both open modes, and the
merged view, the upper dir and the lower dir must come out the same.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable

import pytest

from mounts import Layers, kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root here")

PAGE = mmap.PAGESIZE


def _seed(layers: Layers) -> None:
    lower = layers.lowers[0]
    (lower / "log").write_bytes(b"L" * (PAGE + 100))
    (lower / "data").write_bytes(bytes(range(256)) * 40)


def _appends(mnt: Path) -> None:
    """Two descriptors appending in turn to a lower file and to a new one (generic/069)."""
    for name in ("log", "new"):
        a = os.open(mnt / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        b = os.open(mnt / name, os.O_WRONLY | os.O_APPEND)
        for i in range(3000):
            os.write(a if i % 2 else b, b"%04d" % i)
        os.close(a)
        os.close(b)


def _write_only_partial_pages(mnt: Path) -> None:
    """Write-only, unaligned writes into a lower file: the kernel must read the pages' rest."""
    fd = os.open(mnt / "data", os.O_WRONLY)
    for off in (3, PAGE - 2, 2 * PAGE + 17, 9000):
        os.pwrite(fd, b"xyz", off)
    os.close(fd)


def _mmap_then_stat(mnt: Path) -> None:
    """Shared-mmap writes past the old end after an ftruncate, closed without msync."""
    fd = os.open(mnt / "data", os.O_RDWR)
    os.ftruncate(fd, 3 * PAGE)
    with mmap.mmap(fd, 3 * PAGE) as m:
        m[PAGE - 1:PAGE + 3] = b"mmap"
        m[3 * PAGE - 4:] = b"tail"
    os.close(fd)


def _truncate_and_append(mnt: Path) -> None:
    """O_TRUNC, then appends: the kernel's size must start again from 0."""
    with open(mnt / "log", "ab") as f:
        f.write(b"before")
    fd = os.open(mnt / "log", os.O_WRONLY | os.O_TRUNC | os.O_APPEND)
    os.write(fd, b"after")
    os.close(fd)


def _unlinked_while_open(mnt: Path) -> None:
    """Written and unlinked while open, and a lower file unlinked under a reader: the times
    the kernel passes on after the unlink have no name to go to, and the closes must work."""
    ro = os.open(mnt / "data", os.O_RDONLY)
    rw = os.open(mnt / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(rw, b"written")
    os.unlink(mnt / "data")
    os.unlink(mnt / "gone")
    os.pwrite(rw, b"W", 0)
    assert os.pread(rw, 10, 0) == b"Written" and os.pread(ro, 3, 1) == bytes(range(1, 4))
    # the lower file keeps its own link count (the kernel's times flush must not copy it up)
    assert os.fstat(ro).st_nlink == 1 and os.fstat(rw).st_nlink == 0
    os.close(ro)
    os.close(rw)


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "unlinked-while-open": _unlinked_while_open,
    "appends": _appends, "write-only-partial-pages": _write_only_partial_pages,
    "mmap": _mmap_then_stat, "truncate-append": _truncate_and_append,
}


def _view(root: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_size, p.read_bytes()) for p in sorted(root.iterdir())
            if p.is_file()}


def _run(layers: Layers, mounted, scenario: Callable[[Path], None]) -> tuple:  # noqa: ANN001
    _seed(layers)
    with mounted(layers):
        mnt = layers.mnt
        scenario(mnt)
        merged = _view(mnt)
        stats = {name: os.stat(mnt / name) for name in merged}
    upper = _view(layers.upper)
    # the times the kernel kept are the ones that reached the upper file
    for name in upper:
        assert os.stat(layers.upper / name).st_mtime_ns == stats[name].st_mtime_ns, name
    return merged, upper, _view(layers.lowers[0])


@pytest.mark.parametrize("opens", ["classic", "zero"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_writeback_matches_the_kernel(tmp_path: Path, name: str, opens: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from overlayfuse.fusefs import transport
    if opens == "zero" and not transport.patched():
        pytest.skip("stock pyfuse3: zero-message opens need the patched binding")
    monkeypatch.setenv("OVERLAYFUSE_OPENS", opens)
    scenario = SCENARIOS[name]
    kernel, fuse = make_layers(tmp_path / "k"), make_layers(tmp_path / "f")
    want = _run(kernel, lambda ly: kernel_overlay(ly.lowers, ly.upper, ly.work, ly.mnt),
                scenario)
    got = _run(fuse, lambda ly: overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt,
                                                  ["writeback=1"]), scenario)
    assert got == want
