"""A removed entry that the kernel still holds keeps its inode number (issue 11, test_load).

pyfuse3 uses the inode number as the FUSE node id.  When the backing filesystem gives the
number of a removed entry to a new one while the kernel still holds the old inode, the daemon
hands the node id on with a new generation (inodes.InodeTable._succeed), and the kernel then
marks its old inode bad: every later use of it (an fstat, a lookup through a removed dir that
a concurrent path walk still holds) fails with EIO, where the kernel's overlay answers as for
any removed entry.  Under load that was the rare EIO in the shared dir of test_load.  Here an
O_PATH descriptor holds each removed entry (the daemon hears of no open), new entries take
the freed numbers, and the held ones must still answer as on the kernel's overlay.  Each mode
of the daemon pins differently (overlay.keep_reachable, inofiles.InodeFiles.pin): all three.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from mounts import kernel_overlay, make_layers, overlayfuse_mount
from test_zero_opens import MODES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root")

ROUNDS = 3
PER_KIND = 12
MODES_ALL = [*MODES, "default"]


def _held_removed_entries(mnt: Path) -> list[tuple[str, object]]:
    """Make dirs, files and symlinks, hold each by an O_PATH fd, remove them, fill the freed
    numbers with new entries; then what each held fd answers (its type, or the errno)."""
    out: list[tuple[str, object]] = []
    for r in range(ROUNDS):
        held = []
        for i in range(PER_KIND):
            for kind in ("d", "f", "l"):
                p = mnt / f"{kind}{r}.{i}"
                if kind == "d":
                    p.mkdir()
                elif kind == "f":
                    p.write_bytes(b"x")
                else:
                    p.symlink_to("target")
                held.append((p, os.open(p, os.O_PATH | os.O_NOFOLLOW)))
        try:
            for p, _fd in held:
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
            for i in range(3 * PER_KIND):  # new entries of every kind take the numbers
                (mnt / f"new{r}.d{i}").mkdir()
                (mnt / f"new{r}.f{i}").write_bytes(b"y")
            for p, fd in held:
                try:
                    got: object = stat.filemode(os.fstat(fd).st_mode)[0]
                except OSError as e:
                    got = errno.errorcode[e.errno]
                if p.name.startswith("d"):
                    try:  # a lookup in the removed dir, as a path walk that still holds it
                        os.stat("x", dir_fd=fd)
                        got = (got, "found")
                    except OSError as e:
                        got = (got, errno.errorcode[e.errno])
                out.append((p.name, got))
        finally:
            for _p, fd in held:
                os.close(fd)
    return out


def _on_both(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             steps: Callable[[Path], list]) -> tuple[list, list]:
    """``steps`` on a kernel overlay, then on an overlayfuse mount in ``mode``: (kernel's
    result, overlayfuse's)."""
    if mode != "default":
        monkeypatch.setenv("OVERLAYFUSE_OPENS", mode)
    kernel = make_layers(tmp_path / "kernel")
    with kernel_overlay(kernel.lowers, kernel.upper, kernel.work, kernel.mnt):
        want = steps(kernel.mnt)
    fuse = make_layers(tmp_path / "fuse")
    with overlayfuse_mount(fuse.lowers, fuse.upper, fuse.work, fuse.mnt):
        got = steps(fuse.mnt)
    return want, got


@pytest.mark.parametrize("mode", MODES_ALL)
def test_removed_entries_held_by_the_kernel_keep_their_numbers(
        mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want, got = _on_both(mode, tmp_path, monkeypatch, _held_removed_entries)
    assert all(got in ("-", "l", ("d", "ENOENT")) for _name, got in want), want
    wrong = [f"{name}: kernel {w!r}, overlayfuse {g!r}"
             for (name, w), (_n, g) in zip(want, got) if w != g]
    assert not wrong, "held removed entries answer differently:\n" + "\n".join(wrong)


def _names_of_a_held_link(mnt: Path) -> list[object]:
    """A file with names in two dirs, held by one of them (an O_PATH fd: no open reaches the
    daemon), while the kernel forgets the other dir (drop_caches): the other name must still
    work, through every request that needs the file's path."""
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"data\n")
    os.link(mnt / "d" / "f", mnt / "g")
    fd = os.open(mnt / "g", os.O_PATH)
    out: list[object] = []
    try:
        for _ in range(2):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
            for call in (lambda: os.getxattr(mnt / "d" / "f", "user.k"),
                         lambda: os.setxattr(mnt / "d" / "f", "user.k", b"v"),
                         lambda: os.truncate(mnt / "d" / "f", 3),
                         lambda: (mnt / "d" / "f").read_bytes()):
                try:
                    out.append(call())
                except OSError as e:
                    out.append(errno.errorcode[e.errno])
    finally:
        os.close(fd)
    return out


@pytest.mark.parametrize("mode", MODES_ALL)
def test_a_link_in_a_forgotten_dir_keeps_its_path(
        mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want, got = _on_both(mode, tmp_path, monkeypatch, _names_of_a_held_link)
    assert got == want
