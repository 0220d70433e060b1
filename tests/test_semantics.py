"""Directed semantics tests: one behaviour of the overlay per test, the kernel as the oracle.

Each test that can be an oracle comparison runs twice, once on a kernel overlay
(``redirect_dir=on,index=on``) and once on overlayfuse, and asserts one explicit expected result
that both must produce; the kernel run proves the expectation is the kernel's. Forms of the
on-disk format that the kernel does not read (OCI ``.wh.`` files) are tested on overlayfuse alone,
and say so. The random sequences live in test_differential.py; these tests name the cases.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from helpers import outcome
from mounts import (Layers, diff_trees, kernel_overlay, make_layers, overlayfuse_mount,
                    tree_snapshot)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays and mknod need root")

SYSTEMS = ("kernel", "overlayfuse")
FIXED_NS = 1_000_000_000 * 10**9  # 2001-09-09: a time no test run produces by itself
_CLOCK_REALTIME_COARSE = 5  # the clock of file timestamps (Python has no name for it)
# two ticks of it: a change that far after a stat must give a later time on any filesystem
TIMESTAMP_TICK = 2 * time.clock_getres(_CLOCK_REALTIME_COARSE)
TRUSTED_OVL = "trusted.overlay."
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


# --------------------------------------------------------------------------------- helpers


@pytest.fixture(params=SYSTEMS)
def system(request: pytest.FixtureRequest) -> str:
    """Which overlay the test runs on; both must give the one expected result."""
    return str(request.param)


def mount_system(system: str, layers: Layers, lowers: list[Path] | None = None, *,
                 upper: bool = True, work: Path | None = None
                 ) -> contextlib.AbstractContextManager[Any]:
    """Mount *layers* with the kernel or overlayfuse; always unmounted on exit."""
    lows = layers.lowers if lowers is None else lowers
    u, w = (layers.upper, work or layers.work) if upper else (None, None)
    if system == "kernel":
        return kernel_overlay(lows, u, w, layers.mnt)
    return overlayfuse_mount(lows, u, w, layers.mnt)


def renameat2(src: os.PathLike[str] | str, dst: os.PathLike[str] | str, flags: int) -> None:
    """rename(2) with flags: Python has no binding for renameat2."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                       ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(src))


DIR = "<dir>"
WHITEOUT = "<whiteout>"


class Sym(str):
    """A symlink target in a :func:`build` spec."""


def build(root: Path, spec: dict[str, Any], *, mtime_ns: int | None = FIXED_NS) -> None:
    """Create entries under *root*: bytes are files, DIR dirs, Sym symlinks, WHITEOUT char 0/0.

    Times are set to FIXED_NS (deepest first) so that a change of time is visible.
    """
    for rel, v in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if v == DIR:
            p.mkdir(exist_ok=True)
        elif isinstance(v, Sym):
            os.symlink(str(v), p)
        elif v == WHITEOUT:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            p.write_bytes(v)
    if mtime_ns is not None:
        for d, dirs, files in os.walk(root, topdown=False):
            for n in files + dirs:
                os.utime(os.path.join(d, n), ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        os.utime(root, ns=(mtime_ns, mtime_ns))


def ls(path: os.PathLike[str] | str) -> list[str]:
    return sorted(os.listdir(path))


def is_whiteout(path: os.PathLike[str] | str) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def private_xattrs(path: os.PathLike[str] | str) -> dict[str, bytes]:
    """The overlay's own xattrs of a backing entry (both namespaces)."""
    out = {}
    for n in os.listxattr(path, follow_symlinks=False):
        if n.startswith(("trusted.overlay.", "user.overlay.")):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def walk_mount(mnt: Path) -> Iterator[Path]:
    """Every entry of a merged tree (symlinks not followed), the root first."""
    yield mnt
    for d, dirs, files in os.walk(mnt):
        for n in dirs + files:
            yield Path(d) / n


# --------------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("n_lowers", [1, 2, 50])
def test_lookup_through_n_lowers(system: str, tmp_path: Path, n_lowers: int) -> None:
    """The topmost layer holding a name wins; directories merge across every layer."""
    layers = make_layers(tmp_path / "L", n_lowers)
    for i, low in enumerate(layers.lowers):
        build(low, {f"only{i}": f"only in {i}\n".encode(), "common": f"layer {i}\n".encode(),
                    f"d/x{i}": f"d/x{i}\n".encode(), "d/common": f"d from {i}\n".encode(),
                    f"deep/a/b/c/y{i}": b"y"})
    with mount_system(system, layers) as m:
        m = layers.mnt
        assert ls(m) == sorted(["common", "d", "deep", *(f"only{i}" for i in range(n_lowers))])
        assert (m / "common").read_bytes() == b"layer 0\n"
        assert (m / "d/common").read_bytes() == b"d from 0\n"
        assert ls(m / "d") == sorted(["common", *(f"x{i}" for i in range(n_lowers))])
        assert ls(m / "deep/a/b/c") == sorted(f"y{i}" for i in range(n_lowers))
        for i in range(n_lowers):
            assert (m / f"only{i}").read_bytes() == f"only in {i}\n".encode()
            assert (m / f"d/x{i}").read_bytes() == f"d/x{i}\n".encode()
        assert outcome(os.lstat, m / "missing") == "ENOENT"


def test_lookup_file_above_hides_dir_below(system: str, layers: Layers) -> None:
    """A non-directory in a higher layer ends the merge: the lower dir's entries are gone."""
    build(layers.lowers[1], {"n/inner": b"below", "f": b"file below"})
    build(layers.lowers[0], {"n": b"a file above a dir", "f/": DIR})
    with mount_system(system, layers):
        m = layers.mnt
        assert (m / "n").read_bytes() == b"a file above a dir"
        assert outcome(os.lstat, m / "n/inner") == "ENOTDIR"
        assert (m / "f").is_dir() and ls(m / "f") == []


# --------------------------------------------------------------------------------- whiteouts


def test_char_device_whiteout_hides_lower(system: str, layers: Layers) -> None:
    """A char 0/0 device in a higher layer (lower or upper) hides the name below it."""
    build(layers.lowers[1], {"a": b"a", "b": b"b", "c": b"c", "dd/x": b"x", "keep": b"k"})
    build(layers.lowers[0], {"a": WHITEOUT, "dd": WHITEOUT})
    build(layers.upper, {"b": WHITEOUT})
    with mount_system(system, layers):
        m = layers.mnt
        assert ls(m) == ["c", "keep"]
        for n in ("a", "b", "dd", "dd/x"):
            assert outcome(os.lstat, m / n) == "ENOENT", n
        with os.scandir(m) as it:
            assert sorted(e.name for e in it) == ["c", "keep"]


def test_xattr_whiteout_hides_lower(system: str, layers: Layers) -> None:
    """The kernel's nested-overlay whiteout: an empty file with ``overlay.whiteout``.

    The kernel reads it in a directory marked ``overlay.opaque=x`` (which is *not* opaque),
    so the layer is written that way here."""
    build(layers.lowers[1], {"xd/gone": b"hidden", "xd/stays": b"visible"})
    build(layers.lowers[0], {"xd/gone": b""})
    os.setxattr(layers.lowers[0] / "xd/gone", TRUSTED_OVL + "whiteout", b"y")
    os.setxattr(layers.lowers[0] / "xd", TRUSTED_OVL + "opaque", b"x")
    with mount_system(system, layers):
        m = layers.mnt
        assert ls(m / "xd") == ["stays"]
        assert outcome(os.lstat, m / "xd/gone") == "ENOENT"
        assert (m / "xd/stays").read_bytes() == b"visible"
        assert not any(n.startswith("trusted.overlay") for n in os.listxattr(m / "xd"))


def test_oci_whiteouts_in_a_lower_overlayfuse_only(layers: Layers) -> None:
    """OCI/aufs forms in a lower: ``.wh.NAME`` hides NAME, ``.wh..wh..opq`` makes its dir
    opaque; neither marker shows.

    overlayfuse alone: the kernel does not read these forms (it would show the marker files)."""
    build(layers.lowers[1], {"a": b"a", "od/x": b"x", "keep": b"k", "m/y": b"y"})
    build(layers.lowers[0], {".wh.a": b"", "od/.wh..wh..opq": b"", "od/own": b"own",
                             "m/z": b"z", "m/.wh.y": b""})
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt):
        m = layers.mnt
        assert ls(m) == ["keep", "m", "od"]
        assert outcome(os.lstat, m / "a") == "ENOENT"
        assert outcome(os.lstat, m / ".wh.a") == "ENOENT"
        assert ls(m / "od") == ["own"]
        assert ls(m / "m") == ["z"]
        assert outcome(os.lstat, m / "od/.wh..wh..opq") == "ENOENT"
        # a name brought back over an OCI whiteout is a fresh file
        (m / "a").write_bytes(b"new a")
        assert (m / "a").read_bytes() == b"new a" and ls(m) == ["a", "keep", "m", "od"]


def test_oci_whiteouts_in_the_upper_overlayfuse_only(layers: Layers) -> None:
    """The same forms in the upper, where overlayfuse itself writes ``.wh.NAME`` when mknod is
    refused (DESIGN section 3), so it must read them there too.

    overlayfuse alone: the kernel does not read these forms."""
    build(layers.lowers[1], {"b": b"b", "od2/y": b"y", "keep": b"k"})
    build(layers.upper, {".wh.b": b"", "od2/.wh..wh..opq": b"", "od2/up": b"u"})
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt):
        m = layers.mnt
        assert ls(m) == ["keep", "od2"]
        assert outcome(os.lstat, m / "b") == "ENOENT"
        assert ls(m / "od2") == ["up"]


def test_readonly_mount(system: str, layers: Layers) -> None:
    """``lowerdir=`` alone: the merged tree reads, every change is EROFS."""
    build(layers.lowers[1], {"f": b"f", "d/x": b"x"})
    build(layers.lowers[0], {"d/y": b"y"})
    with mount_system(system, layers, upper=False):
        m = layers.mnt
        assert ls(m) == ["d", "f"] and ls(m / "d") == ["x", "y"]
        assert (m / "f").read_bytes() == b"f"
        res = [outcome(fn, *args) for fn, args in (
            (os.open, (m / "f", os.O_WRONLY)), (os.open, (m / "new", os.O_CREAT | os.O_WRONLY)),
            (os.unlink, (m / "f",)), (os.mkdir, (m / "nd",)), (os.rmdir, (m / "d",)),
            (os.rename, (m / "f", m / "g")), (os.chmod, (m / "f", 0o600)),
            (os.setxattr, (m / "f", "user.x", b"1")), (os.symlink, ("f", m / "s")),
            (os.truncate, (m / "f", 0)))]
        assert res == ["EROFS"] * len(res)
        assert os.statvfs(m).f_flag & os.ST_RDONLY
    assert ls(layers.upper) == [] and ls(layers.work) == []


def test_opaque_xattr_dirs(system: str, layers: Layers) -> None:
    """``overlay.opaque=y`` in a lower or in the upper stops the merge below that dir."""
    build(layers.lowers[1], {"o1/below": b"1", "o2/below": b"2", "m/below": b"3"})
    build(layers.lowers[0], {"o1/above": b"a", "m/above": b"b"})
    build(layers.upper, {"o2/up": b"u"})
    os.setxattr(layers.lowers[0] / "o1", TRUSTED_OVL + "opaque", b"y")
    os.setxattr(layers.upper / "o2", TRUSTED_OVL + "opaque", b"y")
    with mount_system(system, layers):
        m = layers.mnt
        assert ls(m / "o1") == ["above"]
        assert ls(m / "o2") == ["up"]
        assert ls(m / "m") == ["above", "below"]
        assert outcome(os.lstat, m / "o1/below") == "ENOENT"
        assert outcome(os.getxattr, m / "o1", TRUSTED_OVL + "opaque") == "ENODATA"


def test_no_marker_ever_visible(system: str, layers: Layers) -> None:
    """After whiteouts, opaque dirs, redirects and copy-ups, no name or xattr of the overlay's
    own bookkeeping shows through the mount."""
    build(layers.lowers[1], {"f": b"f", "g": b"g", "d/x": b"x", "r/y": b"y", "h": b"h",
                             "o/z": b"z"})
    build(layers.lowers[0], {"o/w": b"w", "h": WHITEOUT})
    os.setxattr(layers.lowers[0] / "o", TRUSTED_OVL + "opaque", b"y")
    with mount_system(system, layers):
        m = layers.mnt
        os.unlink(m / "f")
        os.unlink(m / "d/x")
        os.rmdir(m / "d")
        os.mkdir(m / "d")
        os.rename(m / "r", m / "r2")
        os.chmod(m / "g", 0o600)
        os.link(m / "g", m / "g2")
        for p in walk_mount(m):
            assert not p.name.startswith(".wh."), p
            names = os.listxattr(p, follow_symlinks=False)
            assert not [n for n in names if n.startswith(("trusted.overlay.", "user.overlay."))]
        assert ls(m) == ["d", "g", "g2", "o", "r2"]


# --------------------------------------------------------------------------------- copy-up


def test_copy_up_keeps_data_mode_owner_times_xattrs(system: str, layers: Layers) -> None:
    """chmod copies the file up with everything else it had, parents first, times kept."""
    build(layers.lowers[0], {"d1/d2/f": b"lower data\n" * 100})
    low = layers.lowers[0]
    os.chmod(low / "d1", 0o750)
    os.chown(low / "d1", 11, 12)
    os.chmod(low / "d1/d2", 0o711)
    os.chown(low / "d1/d2/f", 1234, 5678)
    os.chmod(low / "d1/d2/f", 0o640)
    os.setxattr(low / "d1/d2/f", "user.colour", b"blue")
    os.setxattr(low / "d1/d2/f", "trusted.note", b"kept")
    os.setxattr(low / "d1", "user.dir", b"x")
    for p in ("d1/d2/f", "d1/d2", "d1"):
        os.utime(low / p, ns=(FIXED_NS, FIXED_NS + 7))
    with mount_system(system, layers):
        m = layers.mnt
        os.chmod(m / "d1/d2/f", 0o604)
        st = os.lstat(m / "d1/d2/f")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, 1234, 5678)
        assert st.st_mtime_ns == FIXED_NS + 7
        assert (m / "d1/d2/f").read_bytes() == b"lower data\n" * 100
        assert os.getxattr(m / "d1/d2/f", "user.colour") == b"blue"
        assert os.getxattr(m / "d1/d2/f", "trusted.note") == b"kept"
        # the parents look as they did
        for p, mode, owner in (("d1", 0o750, (11, 12)), ("d1/d2", 0o711, (0, 0))):
            pst = os.lstat(m / p)
            assert (stat.S_IMODE(pst.st_mode), (pst.st_uid, pst.st_gid)) == (mode, owner), p
            assert pst.st_mtime_ns == FIXED_NS + 7, f"{p}: mtime changed by the copy-up"
    # and the upper holds the copies, parents included
    up = layers.upper
    ust = os.lstat(up / "d1/d2/f")
    assert (stat.S_IMODE(ust.st_mode), ust.st_uid, ust.st_gid) == (0o604, 1234, 5678)
    assert ust.st_mtime_ns == FIXED_NS + 7
    assert (up / "d1/d2/f").read_bytes() == b"lower data\n" * 100
    assert os.getxattr(up / "d1/d2/f", "user.colour") == b"blue"
    assert os.getxattr(up / "d1", "user.dir") == b"x"
    d1 = os.lstat(up / "d1")
    assert (stat.S_IMODE(d1.st_mode), d1.st_uid, d1.st_gid) == (0o750, 11, 12)
    assert stat.S_IMODE(os.lstat(up / "d1/d2").st_mode) == 0o711
    assert ls(up / "d1/d2") == ["f"]


def test_copy_up_leaves_no_temp_behind(system: str, layers: Layers) -> None:
    """After copy-ups and creates, the work dir holds no stray copy: every regular file there
    is another name of an upper file (an index entry)."""
    build(layers.lowers[0], {"a": b"a" * 100_000, "b": b"b", "d/c": b"c", "h1": b"h"})
    os.link(layers.lowers[0] / "h1", layers.lowers[0] / "h2")
    with mount_system(system, layers):
        m = layers.mnt
        with open(m / "a", "r+b") as f:
            f.write(b"A")
        os.truncate(m / "b", 0)
        os.chmod(m / "d/c", 0o600)
        with open(m / "h1", "ab") as f:
            f.write(b"more")
        (m / "new").write_bytes(b"n")
    upper_inos = {os.lstat(os.path.join(d, n)).st_ino
                  for d, _, files in os.walk(layers.upper) for n in files}
    for d, _, files in os.walk(layers.work):
        for n in files:
            if d == str(layers.work) and n == "overlayfuse-handles":
                continue  # not a copy: the names file handles need after a remount (export.py)
            st = os.lstat(os.path.join(d, n))
            if stat.S_ISREG(st.st_mode):
                assert st.st_ino in upper_inos, f"stray file in the work dir: {d}/{n}"
    assert (layers.upper / "a").read_bytes() == b"A" + b"a" * 99_999


def test_readonly_fd_sees_data_after_copy_up(system: str, layers: Layers) -> None:
    """An fd opened read-only on a lower file reads what a later writer put there (the
    copy-up happens under it; rpm's database depends on this)."""
    build(layers.lowers[0], {"db": b"old contents\n"})
    with mount_system(system, layers):
        m = layers.mnt
        rfd = os.open(m / "db", os.O_RDONLY)
        try:
            assert os.pread(rfd, 100, 0) == b"old contents\n"
            with open(m / "db", "r+b") as f:
                f.write(b"NEW")
            assert os.pread(rfd, 100, 0) == b"NEW contents\n"
            assert os.fstat(rfd).st_size == 13
        finally:
            os.close(rfd)
    assert (layers.upper / "db").read_bytes() == b"NEW contents\n"


# --------------------------------------------------------------------------------- files


def test_open_flags(system: str, layers: Layers) -> None:
    """O_TRUNC, O_APPEND, O_EXCL and O_CREAT over lower files and over a whiteout."""
    build(layers.lowers[1], {"t": b"truncate me", "ap": b"start,", "ex": b"exists",
                             "gone": b"deleted lower data", "plain": b"untouched",
                             "wo": b"open for write"})
    build(layers.lowers[0], {"hidden": WHITEOUT})
    build(layers.lowers[1], {"hidden": b"under a lower whiteout"}, mtime_ns=None)
    with mount_system(system, layers):
        m = layers.mnt
        os.close(os.open(m / "t", os.O_WRONLY | os.O_TRUNC))
        assert (m / "t").read_bytes() == b"" and os.stat(m / "t").st_size == 0
        fd = os.open(m / "ap", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"appended")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"+again")
        os.close(fd)
        assert (m / "ap").read_bytes() == b"start,appended+again"
        assert outcome(os.open, m / "ex", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == "EEXIST"
        assert (m / "ex").read_bytes() == b"exists"
        os.unlink(m / "gone")
        fd = os.open(m / "gone", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        assert os.read(fd, 100) == b""
        os.write(fd, b"reborn")
        os.close(fd)
        assert (m / "gone").read_bytes() == b"reborn"
        assert stat.S_IMODE(os.stat(m / "gone").st_mode) == 0o640
        fd = os.open(m / "hidden", os.O_RDWR | os.O_CREAT, 0o600)
        assert os.read(fd, 100) == b""
        os.close(fd)
        # O_CREAT without O_EXCL on a lower file opens it, keeping the data
        fd = os.open(m / "plain", os.O_RDONLY | os.O_CREAT, 0o600)
        assert os.read(fd, 100) == b"untouched"
        os.close(fd)
        # opening for write copies up even before any write
        os.close(os.open(m / "wo", os.O_WRONLY))
        assert (layers.upper / "wo").read_bytes() == b"open for write"
        assert ls(m) == ["ap", "ex", "gone", "hidden", "plain", "t", "wo"]
    assert not (layers.upper / "plain").exists()
    assert (layers.upper / "gone").read_bytes() == b"reborn"


def test_read_write_truncate_fsync(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"f": bytes(range(256)) * 64, "g": b"0123456789"})
    with mount_system(system, layers):
        m = layers.mnt
        fd = os.open(m / "f", os.O_RDWR)
        try:
            assert os.pread(fd, 4, 254) == bytes([254, 255, 0, 1])
            os.pwrite(fd, b"XYZ", 100_000)  # past the end: a hole
            assert os.fstat(fd).st_size == 100_003
            assert os.pread(fd, 4, 16384) == b"\0" * 4
            os.fsync(fd)
            os.fdatasync(fd)
            os.ftruncate(fd, 10)
            assert os.fstat(fd).st_size == 10
            assert os.pread(fd, 100, 0) == bytes(range(10))
            os.ftruncate(fd, 20)
            assert os.pread(fd, 100, 0) == bytes(range(10)) + b"\0" * 10
        finally:
            os.close(fd)
        os.truncate(m / "g", 4)
        assert (m / "g").read_bytes() == b"0123"
        os.truncate(m / "g", 6)
        assert (m / "g").read_bytes() == b"0123\0\0"
        with open(m / "big", "wb") as f:
            f.write(os.urandom(1) * (3 << 20))
        assert os.stat(m / "big").st_size == 3 << 20
    assert (layers.upper / "g").read_bytes() == b"0123\0\0"
    assert os.stat(layers.upper / "f").st_size == 20


# --------------------------------------------------------------------------------- namespace


def test_unlink_lower_file_writes_char_whiteout(system: str, layers: Layers) -> None:
    build(layers.lowers[1], {"f": b"f", "d/g": b"g", "s": Sym("f")})
    with mount_system(system, layers):
        m = layers.mnt
        os.unlink(m / "f")
        os.unlink(m / "d/g")
        os.unlink(m / "s")
        assert ls(m) == ["d"] and ls(m / "d") == []
        assert outcome(os.unlink, m / "f") == "ENOENT"
        assert outcome(os.unlink, m / "d") == "EISDIR"
    assert is_whiteout(layers.upper / "f")
    assert is_whiteout(layers.upper / "d/g")
    assert is_whiteout(layers.upper / "s")


def test_mkdir_over_whiteout_is_opaque(system: str, layers: Layers) -> None:
    build(layers.lowers[1], {"d/x": b"x", "d/sub/y": b"y"})
    with mount_system(system, layers):
        m = layers.mnt
        assert outcome(os.mkdir, m / "d") == "EEXIST"
        os.unlink(m / "d/x")
        os.unlink(m / "d/sub/y")
        os.rmdir(m / "d/sub")
        os.rmdir(m / "d")
        assert outcome(os.lstat, m / "d") == "ENOENT"
        os.mkdir(m / "d", 0o705)
        assert ls(m / "d") == []
        assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o705
        (m / "d/new").write_bytes(b"n")
        assert ls(m / "d") == ["new"]
    assert private_xattrs(layers.upper / "d").get(TRUSTED_OVL + "opaque") == b"y"


def test_rmdir_follows_the_merged_view(system: str, layers: Layers) -> None:
    """A directory that exists only below is empty or not according to the merged view."""
    build(layers.lowers[1], {"full/x": b"x", "empty/": DIR, "mixed/a": b"a",
                             "shadow/b": b"b"})
    build(layers.lowers[0], {"mixed/c": b"c", "shadow/b": WHITEOUT})
    with mount_system(system, layers):
        m = layers.mnt
        assert outcome(os.rmdir, m / "full") == "ENOTEMPTY"
        assert outcome(os.rmdir, m / "empty") == "ok"
        assert outcome(os.rmdir, m / "mixed") == "ENOTEMPTY"
        # every entry of a merged dir deleted through the mount: now it is empty
        os.unlink(m / "mixed/a")
        assert outcome(os.rmdir, m / "mixed") == "ENOTEMPTY"
        os.unlink(m / "mixed/c")
        assert outcome(os.rmdir, m / "mixed") == "ok"
        # its only lower entry is whited out in a higher lower: empty
        assert outcome(os.rmdir, m / "shadow") == "ok"
        assert outcome(os.rmdir, m / "full/x") == "ENOTDIR"
        assert outcome(os.rmdir, m / "nothing") == "ENOENT"
        assert ls(m) == ["full"]
    for n in ("empty", "mixed", "shadow"):
        assert is_whiteout(layers.upper / n), n


def test_rename_files(system: str, layers: Layers) -> None:
    build(layers.lowers[1], {"a": b"lower a", "b": b"lower b", "d/c": b"c", "e/": DIR})
    with mount_system(system, layers):
        m = layers.mnt
        os.rename(m / "a", m / "a2")
        os.rename(m / "d/c", m / "e/c")
        os.rename(m / "b", m / "a2")  # over an existing (copied-up) name
        assert ls(m) == ["a2", "d", "e"]
        assert (m / "a2").read_bytes() == b"lower b"
        assert ls(m / "d") == [] and ls(m / "e") == ["c"]
        assert (m / "e/c").read_bytes() == b"c"
        assert outcome(os.rename, m / "nothing", m / "x") == "ENOENT"
        assert outcome(os.rename, m / "e/c", m / "d") == "EISDIR"
    assert is_whiteout(layers.upper / "a") and is_whiteout(layers.upper / "b")
    assert is_whiteout(layers.upper / "d/c")


def test_rename_lower_dir_uses_redirect(system: str, layers: Layers) -> None:
    """Renaming a directory that exists in a lower works (never EXDEV) and records a redirect
    that the kernel follows: the upper mounted by the kernel shows the same tree."""
    build(layers.lowers[1], {"d/x": b"x", "d/sub/y": b"y", "m/below": b"b", "t/": DIR})
    build(layers.lowers[0], {"m/above": b"a"})
    with mount_system(system, layers):
        m = layers.mnt
        assert outcome(os.rename, m / "d", m / "d2") == "ok"
        assert outcome(os.rename, m / "m", m / "t/m2") == "ok"  # merged dir, another parent
        (m / "d2/new").write_bytes(b"new")
        assert ls(m) == ["d2", "t"]
        assert ls(m / "d2") == ["new", "sub", "x"]
        assert ls(m / "d2/sub") == ["y"]
        assert ls(m / "t/m2") == ["above", "below"]
        assert (m / "t/m2/below").read_bytes() == b"b"
        # the old name is free again and a fresh dir there is empty
        os.mkdir(m / "d")
        assert ls(m / "d") == []
        seen = tree_snapshot(m, owner=True)
    redirect = private_xattrs(layers.upper / "d2").get(TRUSTED_OVL + "redirect")
    assert redirect in (b"d", b"/d")
    assert private_xattrs(layers.upper / "t/m2").get(TRUSTED_OVL + "redirect") == b"/m"
    work2 = layers.root / "work2"
    work2.mkdir()
    with kernel_overlay(layers.lowers, layers.upper, work2, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt, owner=True)) == []


def test_rename_dir_edge_cases(system: str, layers: Layers) -> None:
    """Directory renames over empty and non-empty (merged-view) dirs, into themselves, and a
    lower dir renamed twice and then back to its own name."""
    build(layers.lowers[1], {"a/x": b"x", "e1/": DIR, "e2/gone": b"g", "full/y": b"y",
                             "b/in": b"i"})
    with mount_system(system, layers):
        m = layers.mnt
        os.unlink(m / "e2/gone")  # empty in the merged view, not below
        res = {
            "over non-empty": outcome(os.rename, m / "a", m / "full"),
            "into itself": outcome(os.rename, m / "a", m / "a/sub"),
            "dir over file": outcome(os.rename, m / "a", m / "b/in"),
            "file over dir": outcome(os.rename, m / "b/in", m / "e1"),
            "over empty lower dir": outcome(os.rename, m / "a", m / "e1"),
            "over emptied dir": outcome(os.rename, m / "full", m / "e2"),
            "twice": outcome(os.rename, m / "b", m / "b2"),
            "again": outcome(os.rename, m / "b2", m / "b3"),
            "back": outcome(os.rename, m / "b3", m / "b"),
        }
        res["ls"] = ls(m)
        res["e1"], res["e2"], res["b"] = ls(m / "e1"), ls(m / "e2"), ls(m / "b")
        seen = tree_snapshot(m)
    assert res == {"over non-empty": "ENOTEMPTY", "into itself": "EINVAL",
                   "dir over file": "ENOTDIR", "file over dir": "EISDIR",
                   "over empty lower dir": "ok", "over emptied dir": "ok", "twice": "ok",
                   "again": "ok", "back": "ok", "ls": ["b", "e1", "e2"], "e1": ["x"],
                   "e2": ["y"], "b": ["in"]}
    work2 = layers.root / "work2"
    work2.mkdir()
    with kernel_overlay(layers.lowers, layers.upper, work2, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt)) == []


def test_parent_times_change_with_its_entries(system: str, layers: Layers) -> None:
    """Each entry change (create, unlink, mkdir, rmdir, symlink, link, a rename out of one
    directory into another) moves its directory's mtime and ctime on: first in a lower-only
    directory, which the change copies up, then in that directory again, now an upper one.

    Times are read before and after each change, a clock tick apart (ctime cannot be set back).
    """
    build(layers.lowers[0], {"cr/": DIR, "un/a": b"a", "un/b": b"b", "mk/": DIR, "rm/a/": DIR,
                             "rm/b/": DIR, "sy/": DIR, "ln/": DIR, "t": b"t", "src/f": b"f",
                             "dst/": DIR})
    with mount_system(system, layers):
        m = layers.mnt

        def changes(n: str) -> list[tuple[str, tuple[str, ...], Callable[[], object]]]:
            """(what, the directories it changes, how) with new names *n*."""
            return [
                ("create", ("cr",), partial((m / "cr" / n).write_bytes, b"n")),
                ("unlink", ("un",), partial(os.unlink, m / "un" / n)),
                ("mkdir", ("mk",), partial(os.mkdir, m / "mk" / n)),
                ("rmdir", ("rm",), partial(os.rmdir, m / "rm" / n)),
                ("symlink", ("sy",), partial(os.symlink, "target", m / "sy" / n)),
                ("link", ("ln",), partial(os.link, m / "t", m / "ln" / n)),
            ]

        first = [*changes("a"), ("rename", ("src", "dst"),
                                 partial(os.rename, m / "src/f", m / "dst/f"))]
        again = [*changes("b"), ("rename", ("dst", "src"),
                                 partial(os.rename, m / "dst/f", m / "src/f"))]
        stale: list[str] = []
        for what, dirs, change in first:
            for d in dirs:
                assert not (layers.upper / d).exists(), f"{d} is not lower-only"
                assert os.lstat(m / d).st_mtime_ns == FIXED_NS, d
            stale += _stale_times(m, what, dirs, change)
            assert all((layers.upper / d).is_dir() for d in dirs), f"{what}: no copy-up"
        for what, dirs, change in again:
            for d in dirs:
                os.utime(m / d, ns=(FIXED_NS, FIXED_NS))  # its mtime back; its ctime now
            stale += _stale_times(m, what, dirs, change)
        assert stale == []


def _stale_times(m: Path, what: str, dirs: tuple[str, ...],
                 change: Callable[[], object]) -> list[str]:
    """The times of *dirs* that *change* did not move on (read a clock tick before it)."""
    before = {d: os.lstat(m / d) for d in dirs}
    time.sleep(TIMESTAMP_TICK)
    change()
    out = []
    for d in dirs:
        st = os.lstat(m / d)
        for t in ("st_mtime_ns", "st_ctime_ns"):
            if getattr(st, t) <= getattr(before[d], t):
                out.append(f"{what}: {d} {t} {getattr(before[d], t)} -> {getattr(st, t)}")
    return out


def test_renameat2_noreplace_and_exchange(system: str, layers: Layers) -> None:
    build(layers.lowers[1], {"a": b"A", "b": b"B", "c": b"C", "d/x": b"x", "e/y": b"y"})
    with mount_system(system, layers):
        m = layers.mnt
        assert outcome(renameat2, m / "a", m / "b", RENAME_NOREPLACE) == "EEXIST"
        assert outcome(renameat2, m / "a", m / "a2", RENAME_NOREPLACE) == "ok"
        assert outcome(renameat2, m / "a2", m / "b", RENAME_EXCHANGE) == "ok"
        assert (m / "a2").read_bytes() == b"B" and (m / "b").read_bytes() == b"A"
        assert outcome(renameat2, m / "c", m / "none", RENAME_EXCHANGE) == "ENOENT"
        assert outcome(renameat2, m / "c", m / "d", RENAME_EXCHANGE) == "ok"
        assert (m / "d").read_bytes() == b"C" and ls(m / "c") == ["x"]
        assert outcome(renameat2, m / "c", m / "e", RENAME_EXCHANGE) == "ok"
        assert ls(m / "c") == ["y"] and ls(m / "e") == ["x"]
        assert outcome(renameat2, m / "b", m / "c", RENAME_NOREPLACE | RENAME_EXCHANGE) \
            == "EINVAL"
        assert ls(m) == ["a2", "b", "c", "d", "e"]
        seen = tree_snapshot(m)
    work2 = layers.root / "work2"
    work2.mkdir()
    with kernel_overlay(layers.lowers, layers.upper, work2, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt)) == []


def test_lower_hard_link_count_after_its_names_go(system: str, layers: Layers) -> None:
    """A name of a hard-linked lower file replaced by a rename, then another unlinked: the
    names left count right, also when their attributes were just read (index=on's counts)."""
    low = layers.lowers[1]
    (low / "hl1").write_bytes(b"linked")
    os.link(low / "hl1", low / "hl2")
    os.link(low / "hl1", low / "hl3")
    (low / "s").write_bytes(b"s")
    with mount_system(system, layers):
        m = layers.mnt
        assert os.stat(m / "hl1").st_nlink == os.stat(m / "hl2").st_nlink == 3
        os.rename(m / "s", m / "hl2")
        assert os.stat(m / "hl1").st_nlink == 2
        os.unlink(m / "hl3")
        assert os.stat(m / "hl1").st_nlink == 1
        assert (m / "hl1").read_bytes() == b"linked" and (m / "hl2").read_bytes() == b"s"
    assert os.stat(low / "hl1").st_nlink == 3  # the lower is untouched


def test_lower_hardlinks_stay_one_inode(system: str, layers: Layers) -> None:
    """Two names of one lower inode stay one inode after one is copied up (index=on)."""
    build(layers.lowers[0], {"h1": b"shared"})
    os.link(layers.lowers[0] / "h1", layers.lowers[0] / "sub_h2")
    with mount_system(system, layers):
        m = layers.mnt
        a, b = os.lstat(m / "h1"), os.lstat(m / "sub_h2")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        with open(m / "h1", "ab") as f:
            f.write(b" and changed")
        a, b = os.lstat(m / "h1"), os.lstat(m / "sub_h2")
        assert a.st_ino == b.st_ino, "copy-up split the hard link"
        assert (a.st_nlink, b.st_nlink) == (2, 2)
        assert (m / "sub_h2").read_bytes() == b"shared and changed"
        os.chmod(m / "sub_h2", 0o600)
        assert stat.S_IMODE(os.lstat(m / "h1").st_mode) == 0o600
        os.link(m / "h1", m / "h3")
        assert {os.lstat(m / n).st_ino for n in ("h1", "sub_h2", "h3")} == {a.st_ino}
        assert os.lstat(m / "h3").st_nlink == 3


def test_link_to_lower_file(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"f": b"data", "d/": DIR})
    with mount_system(system, layers):
        m = layers.mnt
        os.link(m / "f", m / "d/g")
        f, g = os.lstat(m / "f"), os.lstat(m / "d/g")
        assert f.st_ino == g.st_ino and f.st_nlink == g.st_nlink == 2
        with open(m / "d/g", "ab") as fh:
            fh.write(b"+g")
        assert (m / "f").read_bytes() == b"data+g"
        assert outcome(os.link, m / "f", m / "d/g") == "EEXIST"
        assert outcome(os.link, m / "d", m / "d2") == "EPERM"
        os.unlink(m / "f")
        assert os.lstat(m / "d/g").st_nlink == 1
    u = os.lstat(layers.upper / "d/g")
    assert u.st_size == 6


def test_symlink_and_readlink(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"low": Sym("target/of/lower"), "f": b"f"})
    with mount_system(system, layers):
        m = layers.mnt
        os.symlink("f", m / "s")
        os.symlink("/absolute/nowhere", m / "abs")
        assert os.readlink(m / "s") == "f" and (m / "s").read_bytes() == b"f"
        assert os.readlink(m / "low") == "target/of/lower"
        assert os.readlink(m / "abs") == "/absolute/nowhere"
        assert stat.S_ISLNK(os.lstat(m / "abs").st_mode)
        assert os.lstat(m / "abs").st_size == len("/absolute/nowhere")
        assert outcome(os.readlink, m / "f") == "EINVAL"
        assert outcome(os.symlink, "x", m / "f") == "EEXIST"
        long_target = "t" * 4000
        os.symlink(long_target, m / "long")
        assert os.readlink(m / "long") == long_target
    assert os.readlink(layers.upper / "s") == "f"


def test_mknod_fifo_socket_and_devices(system: str, layers: Layers) -> None:
    with mount_system(system, layers):
        m = layers.mnt
        os.mkfifo(m / "fifo", 0o640)
        os.mknod(m / "sock", stat.S_IFSOCK | 0o600)
        os.mknod(m / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(m / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.fspath(m / "bound"))
        want = {"fifo": (stat.S_IFIFO, 0), "sock": (stat.S_IFSOCK, 0), "bound": (stat.S_IFSOCK, 0),
                "chr": (stat.S_IFCHR, os.makedev(1, 3)), "blk": (stat.S_IFBLK, os.makedev(7, 200))}
        for n, (kind, rdev) in want.items():
            st = os.lstat(m / n)
            assert (stat.S_IFMT(st.st_mode), st.st_rdev) == (kind, rdev), n
        assert stat.S_IMODE(os.lstat(m / "fifo").st_mode) == 0o640
        assert outcome(os.mkfifo, m / "fifo") == "EEXIST"
    for n, (kind, rdev) in want.items():
        st = os.lstat(layers.upper / n)
        assert (stat.S_IFMT(st.st_mode), st.st_rdev) == (kind, rdev), n


def test_chmod_chown_utimens(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"f": b"f", "d/x": b"x", "l": Sym("f")})
    with mount_system(system, layers):
        m = layers.mnt
        os.chmod(m / "f", 0o4751)
        os.chown(m / "f", 1234, 4321)
        os.utime(m / "f", ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
        os.chmod(m / "d", 0o700)
        os.chown(m / "l", 77, 88, follow_symlinks=False)
        os.utime(m / "l", ns=(FIXED_NS + 1, FIXED_NS + 2), follow_symlinks=False)
        st = os.lstat(m / "f")
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        assert st.st_atime_ns == 1_111_111_111_123_456_789
        assert st.st_mtime_ns == 1_222_222_222_987_654_321
        mode_after = stat.S_IMODE(st.st_mode)
        assert mode_after == 0o751  # chown drops set-uid, also when root does it
        assert stat.S_IMODE(os.lstat(m / "d").st_mode) == 0o700
        ls_ = os.lstat(m / "l")
        assert (ls_.st_uid, ls_.st_gid, ls_.st_mtime_ns) == (77, 88, FIXED_NS + 2)
        assert (m / "f").read_bytes() == b"f"
    u = os.lstat(layers.upper / "f")
    assert (u.st_uid, u.st_gid, stat.S_IMODE(u.st_mode)) == (1234, 4321, mode_after)
    assert u.st_mtime_ns == 1_222_222_222_987_654_321
    assert stat.S_IMODE(os.lstat(layers.upper / "d").st_mode) == 0o700


def test_chown_clears_setuid_like_the_kernel(system: str, layers: Layers) -> None:
    """chown by root of a set-uid file: the mode bits afterwards are the kernel's."""
    build(layers.lowers[0], {"f": b"f"})
    os.chmod(layers.lowers[0] / "f", 0o6755)
    with mount_system(system, layers):
        os.chown(layers.mnt / "f", 1, 1)
        assert stat.S_IMODE(os.lstat(layers.mnt / "f").st_mode) == 0o755


def test_user_xattrs(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"f": b"f", "d/": DIR})
    os.setxattr(layers.lowers[0] / "f", "user.from_lower", b"L")
    with mount_system(system, layers):
        m = layers.mnt
        assert os.getxattr(m / "f", "user.from_lower") == b"L"
        os.setxattr(m / "f", "user.new", b"value\0binary")
        assert os.getxattr(m / "f", "user.new") == b"value\0binary"
        assert sorted(os.listxattr(m / "f")) == ["user.from_lower", "user.new"]
        os.removexattr(m / "f", "user.from_lower")
        assert sorted(os.listxattr(m / "f")) == ["user.new"]
        assert outcome(os.getxattr, m / "f", "user.from_lower") == "ENODATA"
        assert outcome(os.removexattr, m / "f", "user.nothing") == "ENODATA"
        assert outcome(os.setxattr, m / "f", "user.new", b"x", os.XATTR_CREATE) == "EEXIST"
        assert outcome(os.setxattr, m / "f", "user.none", b"x", os.XATTR_REPLACE) == "ENODATA"
        os.setxattr(m / "d", "user.dir", b"")
        assert os.getxattr(m / "d", "user.dir") == b""
        os.setxattr(m / "f", "trusted.t", b"t")
        assert os.getxattr(m / "f", "trusted.t") == b"t"
    assert os.getxattr(layers.upper / "f", "user.new") == b"value\0binary"
    assert "user.from_lower" not in os.listxattr(layers.upper / "f")
    assert os.getxattr(layers.lowers[0] / "f", "user.from_lower") == b"L"


def test_statfs(system: str, layers: Layers) -> None:
    """statfs reports the upper's filesystem (sizes) and a 255-byte name limit."""
    with mount_system(system, layers):
        sm, su = os.statvfs(layers.mnt), os.statvfs(layers.upper)
        assert sm.f_namemax == 255
        assert sm.f_blocks * sm.f_frsize == su.f_blocks * su.f_frsize
        assert abs(sm.f_bavail * sm.f_frsize - su.f_bavail * su.f_frsize) < 256 << 20
        assert sm.f_files == su.f_files


def test_name_max(system: str, layers: Layers) -> None:
    n255, n256 = "n" * 255, "n" * 256
    build(layers.lowers[0], {"l" * 255: b"long lower name", "d/": DIR})
    with mount_system(system, layers):
        m = layers.mnt
        assert (m / ("l" * 255)).read_bytes() == b"long lower name"
        (m / n255).write_bytes(b"ok")
        assert (m / n255).read_bytes() == b"ok"
        os.mkdir(m / "d" / n255)
        os.rename(m / n255, m / "d" / n255 / n255)
        assert ls(m / "d" / n255) == [n255]
        for fn, args in ((os.open, (m / n256, os.O_CREAT | os.O_WRONLY)), (os.mkdir, (m / n256,)),
                         (os.lstat, (m / n256,)), (os.symlink, ("x", m / n256)),
                         (os.rename, (m / "d", m / n256)), (os.link, (m / "d" / n255 / n255,
                                                                     m / n256)),
                         (os.mkfifo, (m / n256,))):
            assert outcome(fn, *args) == "ENAMETOOLONG", fn.__name__
        assert ls(m) == sorted(["d", "l" * 255])


def test_path_max(system: str, tmp_path: Path) -> None:
    """Paths up to 4095 bytes work through the mount even where the backing path (the layer
    dir's name is longer than the mount point's) exceeds PATH_MAX."""
    layers = make_layers(tmp_path / "L", 1)
    layers = Layers(layers.root, layers.lowers, layers.upper, layers.work,
                    Path(os.path.realpath(layers.root / "m")))
    layers.mnt.mkdir()
    comp = "c" * 200
    # as many 200-byte levels as fit, leaving 50..250 bytes for the last name
    levels = (4095 - len(str(layers.mnt)) - 1 - 50) // (len(comp) + 1)
    # a deep tree in the lower, made with dir fds (its own absolute path is too long)
    fd = os.open(layers.lowers[0], os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(comp, dir_fd=fd)
        nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("deepfile", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    with mount_system(system, layers):
        m = str(layers.mnt)
        deep = m + ("/" + comp) * levels
        assert os.lstat(deep + "/deepfile").st_size == 0
        # fill up to exactly 4095 bytes
        rest = 4095 - len(deep) - 1
        assert 50 <= rest <= 255
        longest = deep + "/" + "z" * rest
        assert len(longest) == 4095
        with open(longest, "wb") as f:
            f.write(b"deep data")
        assert open(longest, "rb").read() == b"deep data"
        with open(deep + "/deepfile", "wb") as f:  # a copy-up many levels down
            f.write(b"x")
        assert outcome(os.lstat, longest + "z") == "ENAMETOOLONG"
    # the upper got it, at a path longer than PATH_MAX
    fd = os.open(layers.upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert sorted(os.listdir(fd)) == sorted(["deepfile", "z" * rest])
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------- inodes


def _inode_map(m: Path) -> dict[str, int]:
    """name -> st_ino for every entry (lstat), checked against readdir's d_ino on the way."""
    out = {}
    for d, dirs, files in os.walk(m):
        with os.scandir(d) as it:
            for e in it:
                st = os.lstat(e.path)
                st_ino = st.st_ino
                assert e.inode() == st_ino, f"{e.path}: readdir ino {e.inode()} != stat {st_ino}"
                # d_type agrees with lstat
                assert (e.is_dir(follow_symlinks=False), e.is_symlink(),
                        e.is_file(follow_symlinks=False)) == (
                    stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode),
                    stat.S_ISREG(st.st_mode)), e.path
                out[os.path.relpath(e.path, m)] = st_ino
    return out


def test_inode_numbers_stat_readdir_and_remount(system: str, layers: Layers) -> None:
    build(layers.lowers[1], {"lf": b"l", "md/x": b"x", "ld/y": b"y", "cu": b"c", "s": Sym("lf")})
    build(layers.lowers[0], {"md/z": b"z", "top": b"t"})
    with mount_system(system, layers):
        m = layers.mnt
        (m / "uf").write_bytes(b"u")
        os.mkdir(m / "ud")
        before = os.lstat(m / "cu").st_ino
        os.chmod(m / "cu", 0o600)
        assert os.lstat(m / "cu").st_ino == before, "copy-up changed st_ino"
        os.rename(m / "ld", m / "ld2")
        first = _inode_map(m)
        assert len(set(first.values())) == len(first), "two entries share an inode number"
        root_ino = os.lstat(m).st_ino
    with mount_system(system, layers):
        assert _inode_map(layers.mnt) == first
        assert os.lstat(layers.mnt).st_ino == root_ino


def test_unlinked_open_file_has_nlink_zero(system: str, layers: Layers) -> None:
    build(layers.lowers[0], {"low": b"lower"})
    with mount_system(system, layers):
        m = layers.mnt
        (m / "new").write_bytes(b"new")
        fd1 = os.open(m / "new", os.O_RDWR)
        fd2 = os.open(m / "low", os.O_RDWR)
        try:
            os.unlink(m / "new")
            os.unlink(m / "low")
            assert os.fstat(fd1).st_nlink == 0
            assert os.fstat(fd2).st_nlink == 0
            os.pwrite(fd2, b"L", 0)
            assert os.pread(fd2, 10, 0) == b"Lower"
            assert os.pread(fd1, 10, 0) == b"new"
        finally:
            os.close(fd1)
            os.close(fd2)
        assert ls(m) == []


def test_open_fds_follow_their_inode(system: str, layers: Layers) -> None:
    """fstat on an old fd shows changes made by path; an fd on a deleted or replaced lower
    file still reads that file."""
    build(layers.lowers[0], {"f": b"0123456789", "gone": b"still readable",
                             "target": b"old target", "src": b"new content"})
    with mount_system(system, layers):
        m = layers.mnt
        fd = os.open(m / "f", os.O_RDONLY)
        gfd = os.open(m / "gone", os.O_RDONLY)
        tfd = os.open(m / "target", os.O_RDONLY)
        try:
            os.chmod(m / "f", 0o600)
            os.truncate(m / "f", 4)
            os.utime(m / "f", ns=(FIXED_NS + 5, FIXED_NS + 5))
            st = os.fstat(fd)
            assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns) == \
                (0o600, 4, FIXED_NS + 5)
            assert os.pread(fd, 100, 0) == b"0123"
            os.unlink(m / "gone")
            assert os.pread(gfd, 100, 0) == b"still readable"
            os.rename(m / "src", m / "target")
            assert os.pread(tfd, 100, 0) == b"old target"
            assert (m / "target").read_bytes() == b"new content"
        finally:
            for x in (fd, gfd, tfd):
                os.close(x)


# --------------------------------------------------------------------------------- cross-mount

CROSS_LOWER = {"f": b"file\n", "g": b"gone\n", "d/x": b"x", "d/sub/y": b"y", "o/z": b"z",
               "h1": b"hard", "r/in": b"r", "s": Sym("f")}


def _cross_ops(m: Path) -> None:
    """One of every kind of change, each leaving its own mark in the upper."""
    with open(m / "f", "ab") as f:
        f.write(b"appended\n")
    os.unlink(m / "g")
    os.unlink(m / "o/z")
    os.rmdir(m / "o")
    os.mkdir(m / "o")
    (m / "o/fresh").write_bytes(b"fresh")
    os.rename(m / "d", m / "d2")
    os.rename(m / "r", m / "d2/r")
    os.chmod(m / "d2/sub/y", 0o600)
    os.link(m / "h1", m / "h2")
    os.symlink("d2/x", m / "newlink")
    os.mkfifo(m / "fifo")
    os.setxattr(m / "s", "trusted.k", b"v", follow_symlinks=False)
    os.setxattr(m / "f", "user.k", b"v")


def test_overlayfuse_upper_mounts_in_kernel(layers: Layers) -> None:
    """The upper overlayfuse writes shows the same tree under the kernel (same lowers)."""
    build(layers.lowers[1], CROSS_LOWER)
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt):
        _cross_ops(layers.mnt)
        seen = tree_snapshot(layers.mnt, owner=True)
    work2 = layers.root / "work2"
    work2.mkdir()
    with kernel_overlay(layers.lowers, layers.upper, work2, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt, owner=True)) == []
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt, owner=True)) == []


def _raw(root: Path) -> dict[str, Any]:
    """The backing tree itself, private xattrs and times included."""
    out: dict[str, Any] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files + ["."]:
            p = os.path.join(d, n)
            st = os.lstat(p)
            xs = sorted((x, os.getxattr(p, x, follow_symlinks=False))
                        for x in os.listxattr(p, follow_symlinks=False))
            out[os.path.normpath(os.path.relpath(p, root))] = (
                st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, xs)
    return out


def test_kernel_upper_mounts_in_overlayfuse_unchanged(layers: Layers) -> None:
    """The upper (and work dir) the kernel wrote mounts in overlayfuse with the same tree, and
    browsing it through overlayfuse changes nothing on disk."""
    build(layers.lowers[1], CROSS_LOWER)
    with kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt):
        _cross_ops(layers.mnt)
        seen = tree_snapshot(layers.mnt, owner=True)
    raw = _raw(layers.upper)
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt):
        assert diff_trees(seen, tree_snapshot(layers.mnt, owner=True)) == []
    after = _raw(layers.upper)
    assert diff_trees(raw, after) == []


# --------------------------------------------------------------------------------- ownership


def as_user(uid: int, gid: int, cwd: Path, fn: Callable[[], Any]) -> Any:
    """Run *fn* in a forked child that changed into *cwd* and then to uid/gid (all three of
    real, effective and saved); returns its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            data = json.dumps(fn()).encode()
            os.write(w, data)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"child-error": repr(e)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"null")
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def test_new_entries_belong_to_the_caller(system: str, layers: Layers) -> None:
    """As root (allow_other, default_permissions), entries made by another uid are its own,
    also inside a directory that exists only in a lower; permissions are enforced."""
    build(layers.lowers[0], {"pub/": DIR, "pub/rootfile": b"root's"})
    os.chmod(layers.lowers[0] / "pub", 0o1777)
    uid, gid = 4321, 4322

    def work() -> dict[str, Any]:
        res = {}
        fd = os.open("file", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        os.mkdir("dir")
        os.symlink("file", "link")
        os.mkfifo("fifo")
        os.mknod("sock", stat.S_IFSOCK | 0o600)
        os.mkdir("dir/inner")
        res["write_root_file"] = outcome(os.open, "rootfile", os.O_WRONLY)
        res["unlink_root_file"] = outcome(os.unlink, "rootfile")  # sticky dir
        res["chmod_root_file"] = outcome(os.chmod, "rootfile", 0o777)
        return res

    with mount_system(system, layers):
        res = as_user(uid, gid, layers.mnt / "pub", work)
        assert res == {"write_root_file": "EACCES", "unlink_root_file": "EPERM",
                       "chmod_root_file": "EPERM"}
        for n in ("file", "dir", "link", "fifo", "sock", "dir/inner"):
            st = os.lstat(layers.mnt / "pub" / n)
            assert (st.st_uid, st.st_gid) == (uid, gid), n
        pst = os.lstat(layers.mnt / "pub")
        assert (pst.st_uid, pst.st_gid, stat.S_IMODE(pst.st_mode)) == (0, 0, 0o1777)
    for n in ("file", "dir", "link", "fifo", "sock", "dir/inner"):
        st = os.lstat(layers.upper / "pub" / n)
        assert (st.st_uid, st.st_gid) == (uid, gid), n
