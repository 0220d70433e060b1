"""fallocate(2) through overlayfuse, step for step against the kernel's overlayfs.

The kernel's overlay passes fallocate to the upper file (copying a lower file up first);
overlayfuse does the same through tools/pyfuse3/fallocate.patch.  Each test runs the same steps
on a kernel overlay and an overlayfuse mount over copies of the same layers and compares what a
program sees: the call's outcome, sizes, contents (also through pages cached before the call),
whether st_blocks went down, up or stayed, the upper files left behind and the untouched lowers.
Both open modes (classic, zero-message) and the writeback cache are covered.

One difference is the kernel's FUSE module, not the daemon: it sends FUSE_FALLOCATE only for
FALLOC_FL_KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE and answers COLLAPSE_RANGE and INSERT_RANGE with
EOPNOTSUPP itself (fs/fuse/file.c, fuse_file_fallocate), where the kernel's overlay lets ext4 do
them: ``test_collapse_and_insert_stop_at_the_kernels_fuse`` pins that down.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import outcome
from mounts import kernel_overlay, make_layers, overlayfuse_mount

KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # the name outcome() gives (ENOTSUP, the alias)
SIZE = 64 * 1024
PATTERN = bytes(range(1, 256)) * (SIZE // 255) + b"\xff" * (SIZE % 255)  # no zero byte

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _has_handler() -> bool:
    from overlayfuse.fusefs import transport
    return transport.has_fallocate()


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root")
needs_handler = pytest.mark.skipif(not _has_handler(), reason=(
    "this pyfuse3 lacks the fallocate handler (tools/pyfuse3/fallocate.patch): fallocate is "
    "EOPNOTSUPP on every overlayfuse mount"))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.fixture(params=[("classic", ()), ("zero", ()), ("classic", ("writeback=1",)),
                        ("zero", ("writeback=1",))],
                ids=["classic", "zero", "classic-writeback", "zero-writeback"])
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[str, ...]:
    """Sets the open mode (OVERLAYFUSE_OPENS) of every overlayfuse mount in the test; returns
    the extra -o items."""
    opens, extra = request.param
    from overlayfuse.fusefs import transport
    if opens == "zero" and not transport.patched():
        pytest.skip("stock pyfuse3: zero-message opens need the patched binding")
    monkeypatch.setenv("OVERLAYFUSE_OPENS", opens)
    return extra


MODES = {"allocate": 0, "keep_size": KEEP_SIZE, "punch_hole": PUNCH_HOLE | KEEP_SIZE,
         "zero_range": ZERO_RANGE, "zero_range_keep_size": ZERO_RANGE | KEEP_SIZE}
RANGES = ((8192, 16384), (SIZE - 4096, 3 * 4096))  # inside the file; across its end
CASES = [(f"{label}_{offset}", mode, offset, length)
         for label, mode in MODES.items() for offset, length in RANGES]
# one lower file per case (each copied up by its own first fallocate), and a few more
LOWER_FILES = tuple(name for name, *_ in CASES) + ("low", "low_ro", "low_big")


@contextlib.contextmanager
def both(tmp_path: Path, extra: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Kernel overlay and overlayfuse over copies of one lower holding LOWER_FILES; yields
    {"kernel": layers, "overlayfuse": layers}, both mounted."""
    k, f = make_layers(tmp_path / "k", 1), make_layers(tmp_path / "f", 1)
    for layers in (k, f):
        os.chmod(layers.root, 0o755)
        for name in LOWER_FILES:
            (layers.lowers[0] / name).write_bytes(PATTERN)
    with kernel_overlay(k.lowers, k.upper, k.work, k.mnt), \
            overlayfuse_mount(f.lowers, f.upper, f.work, f.mnt, extra=extra):
        yield {"kernel": k, "overlayfuse": f}


def compare(tmp_path: Path, extra: tuple[str, ...], steps: Callable[[Path], Any]) -> Any:
    """Run ``steps`` on both mounts; the results, the upper files and the lowers must agree."""
    with both(tmp_path, extra) as mounts:
        results = {name: steps(layers.mnt) for name, layers in mounts.items()}
    assert results["overlayfuse"] == results["kernel"]
    uppers = {name: {p.name: p.read_bytes() for p in sorted(ly.upper.iterdir()) if p.is_file()}
              for name, ly in mounts.items()}
    assert uppers["overlayfuse"] == uppers["kernel"]
    for ly in mounts.values():  # a copy-up never writes into the lower
        for name in LOWER_FILES:
            assert (ly.lowers[0] / name).read_bytes() == PATTERN, name
    return results["kernel"]


def _blocks(before: int, after: int) -> str:
    return "fewer" if after < before else "more" if after > before else "same"


def _copied_up_blocks(mnt: Path) -> int:
    """st_blocks of a lower file copied up without a fallocate: the copy-up's own xattrs may
    take a block of their own (overlayfuse keeps one more than the kernel, which on ext4 with
    small inodes no longer fits inline), a difference that is not fallocate's."""
    os.chmod(mnt / "low", 0o644)  # a copy-up; the reply carries the new attributes
    return os.stat(mnt / "low").st_blocks


def _apply(mnt: Path, name: str, mode: int, offset: int, length: int,
           before: int | None = None) -> tuple:
    """fallocate on ``name`` (its pages read into the cache first), then what a program sees:
    (outcome, size by fd and by path, st_blocks fewer/same/more than ``before`` (or than at
    the open), zero bytes, the data)."""
    path = mnt / name
    fd = os.open(path, os.O_RDWR)
    try:
        if before is None:
            before = os.fstat(fd).st_blocks
        assert os.pread(fd, SIZE, 0) == PATTERN
        got = outcome(fallocate, fd, mode, offset, length)
        st = os.fstat(fd)
        data = os.pread(fd, st.st_size + 1, 0)
    finally:
        os.close(fd)
    return (got, st.st_size, os.stat(path).st_size, _blocks(before, st.st_blocks),
            data.count(0), data)


@needs_handler
@pytest.mark.parametrize("where", ["upper", "lower"])
def test_each_mode_matches_the_kernel(tmp_path: Path, variant: tuple[str, ...], where: str
                                      ) -> None:
    """Every mode the kernel's FUSE passes on, inside the file and across its end, on an upper
    file and on a lower one (copied up by the open for write or, with zero-message opens, by
    the fallocate itself; the lower stays byte for byte as it was)."""
    def steps(mnt: Path) -> dict[str, Any]:
        got = {}
        before = _copied_up_blocks(mnt) if where == "lower" else None
        for name, mode, offset, length in CASES:
            if where == "upper":
                name = "u_" + name
                (mnt / name).write_bytes(PATTERN)
            got[name] = _apply(mnt, name, mode, offset, length, before)
        return got

    got = compare(tmp_path, variant, steps)
    p = "u_" if where == "upper" else ""
    assert all(r[0] == "ok" for r in got.values()), got
    assert got[p + "punch_hole_8192"][3] == "fewer"      # the upper fs freed the blocks
    assert got[p + "punch_hole_8192"][4] == 16384         # and the range reads as zeros
    assert got[p + "zero_range_keep_size_61440"][1] == SIZE
    assert got[p + "allocate_61440"][1:3] == (SIZE + 8192, SIZE + 8192)
    assert got[p + "zero_range_61440"][1] == SIZE + 8192


@needs_handler
def test_errors_match_the_kernel(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """Bad modes and ranges, a directory, a read-only fd (EBADF, and no copy-up), an O_APPEND
    fd, a range past the upper filesystem's largest file."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "f").write_bytes(PATTERN)
        got = []
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            for mode, offset, length in ((0x1000, 0, 4096), (PUNCH_HOLE, 0, 4096),
                                         (ZERO_RANGE | PUNCH_HOLE | KEEP_SIZE, 0, 4096),
                                         (0, -1, 4096), (0, 0, 0), (0, 0, -4096),
                                         (KEEP_SIZE, 0, 1 << 45), (0, 1 << 45, 4096)):
                got.append(outcome(fallocate, fd, mode, offset, length))
        finally:
            os.close(fd)
        dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        ro = os.open(mnt / "low_ro", os.O_RDONLY)
        app = os.open(mnt / "f", os.O_WRONLY | os.O_APPEND)
        try:
            got += [outcome(fallocate, dfd, 0, 0, 4096), outcome(fallocate, ro, 0, 0, 4096),
                    outcome(fallocate, ro, PUNCH_HOLE | KEEP_SIZE, 0, 4096),
                    outcome(fallocate, app, PUNCH_HOLE | KEEP_SIZE, 0, 4096),
                    outcome(fallocate, app, 0, SIZE, 4096), os.fstat(app).st_size]
        finally:
            for fd in (dfd, ro, app):
                os.close(fd)
        got.append((mnt / "f").read_bytes().count(0))
        return got

    got = compare(tmp_path, variant, steps)
    assert got == [NOTSUP, NOTSUP, NOTSUP, "EINVAL", "EINVAL", "EINVAL",
                   "EFBIG", "EFBIG", "EBADF", "EBADF", "EBADF", "ok", "ok", SIZE + 4096, 4096 * 2]


_AS_USER = """
import ctypes, os, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
fd = os.open(sys.argv[1], os.O_RDWR)
if sys.argv[2] == "write":
    print(os.pwrite(fd, b"w", 0), 0)
else:
    print(libc.fallocate(fd, int(sys.argv[2]), 0, 8192), ctypes.get_errno())
"""


@needs_handler
def test_a_non_owner_clears_setuid_and_setgid(open_tmp: Path, variant: tuple[str, ...]) -> None:
    """As a write: fallocate by a caller without CAP_FSETID drops S_ISUID, and S_ISGID where
    group execute is set; root keeps them (both as the kernel's overlay does).

    S_ISGID without group execute, the caller outside the file's group: the kernel's overlay
    drops it (setattr_should_drop_sgid, since 6.2), the kernel's FUSE module still keeps it
    (fuse_setattr's own rule, the same for a write(2)): there fallocate must do what a write
    does on the same mount."""
    def steps(mnt: Path) -> dict[str, Any]:
        got = {}
        for name, mode, who, how in (("a", 0o6777, "user", "0"), ("b", 0o2767, "user", "0"),
                                     ("b_write", 0o2767, "user", "write"),
                                     ("c", 0o6777, "root", "0"),
                                     ("d", 0o6777, "user", str(PUNCH_HOLE | KEEP_SIZE)),
                                     ("e", 0o6777, "user", str(KEEP_SIZE))):
            path = mnt / name
            path.write_bytes(PATTERN)
            os.chown(path, 1000, 1000)
            os.chmod(path, mode)
            if who == "root":
                fd = os.open(path, os.O_RDWR)
                try:
                    r: Any = outcome(fallocate, fd, int(how), 0, 8192)
                finally:
                    os.close(fd)
            else:
                p = subprocess.run(["/usr/bin/python3", "-c", _AS_USER, str(path), how],
                                   user=1001, group=1001, extra_groups=[], capture_output=True,
                                   text=True, check=True)
                r = p.stdout.split()
            got[name] = (r, oct(os.stat(path).st_mode))
        return got

    with both(open_tmp, variant) as mounts:
        results = {name: steps(ly.mnt) for name, ly in mounts.items()}
    kernel, fuse = results["kernel"], results["overlayfuse"]
    assert kernel["b"] == (["0", "0"], "0o100767") and kernel["b_write"][1] == "0o100767"
    assert fuse["b"][0] == ["0", "0"] and fuse["b"][1] == fuse["b_write"][1]
    for r in (kernel, fuse):
        del r["b"], r["b_write"]
    assert fuse == kernel
    assert kernel["a"][1] == "0o100777" and kernel["c"][1] == "0o106777"
    assert kernel["d"][1] == kernel["e"][1] == "0o100777"


@needs_handler
def test_a_reader_from_before_the_copy_up_sees_the_new_data(tmp_path: Path,
                                                           variant: tuple[str, ...]) -> None:
    def steps(mnt: Path) -> list[Any]:
        ro = os.open(mnt / "low_ro", os.O_RDONLY)
        try:
            first = os.pread(ro, SIZE, 0) == PATTERN
            rw = os.open(mnt / "low_ro", os.O_RDWR)
            try:
                r = outcome(fallocate, rw, PUNCH_HOLE | KEEP_SIZE, 0, 16384)
            finally:
                os.close(rw)
            return [first, r, os.pread(ro, SIZE, 0).count(0), os.fstat(ro).st_size]
        finally:
            os.close(ro)

    assert compare(tmp_path, variant, steps) == [True, "ok", 16384, SIZE]


@needs_handler
def test_an_open_file_whose_name_is_gone(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """A lower file opened for write and then unlinked (with zero-message opens the daemon
    copies it into an unnamed file at the first change) and an upper one: fallocate still
    reaches the data through the open fd."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "up").write_bytes(PATTERN)
        got = []
        for name in ("low", "up"):
            fd = os.open(mnt / name, os.O_RDWR)
            try:
                os.unlink(mnt / name)
                got += [outcome(fallocate, fd, PUNCH_HOLE | KEEP_SIZE, 0, 8192),
                        outcome(fallocate, fd, 0, SIZE, 8192), os.fstat(fd).st_size,
                        os.pread(fd, 2 * SIZE, 0).count(0)]
            finally:
                os.close(fd)
        return got

    assert compare(tmp_path, variant, steps) == ["ok", "ok", SIZE + 8192, 16384] * 2


@needs_handler
def test_large_ranges(tmp_path: Path, variant: tuple[str, ...]) -> None:
    """Ranges large enough for the daemon to run the call in a thread (fusefs/falloc.py)."""
    big = 24 << 20

    def steps(mnt: Path) -> list[Any]:
        fd = os.open(mnt / "low_big", os.O_RDWR)
        try:
            got = [outcome(fallocate, fd, 0, 0, big), os.fstat(fd).st_size,
                   outcome(fallocate, fd, KEEP_SIZE, big, big), os.fstat(fd).st_size,
                   os.fstat(fd).st_blocks * 512 >= 2 * big,
                   os.fstat(fd).st_blocks]
            got += [outcome(fallocate, fd, PUNCH_HOLE | KEEP_SIZE, 0, big),
                    _blocks(got.pop(), os.fstat(fd).st_blocks), os.pread(fd, SIZE, 0).count(0)]
        finally:
            os.close(fd)
        return got

    assert compare(tmp_path, variant, steps) == ["ok", big, "ok", big, True, "ok", "fewer", SIZE]


@needs_handler
def test_collapse_and_insert_stop_at_the_kernels_fuse(tmp_path: Path) -> None:
    """The kernel's FUSE module refuses COLLAPSE_RANGE and INSERT_RANGE itself (EOPNOTSUPP,
    the daemon never hears of them), where the kernel's overlay lets ext4 do them.  Should a
    kernel pass them on one day, the daemon does too and the results must match the kernel's."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "f").write_bytes(PATTERN)
        got = []
        for name, mode, flags in (("f", COLLAPSE_RANGE, os.O_RDWR), ("low", COLLAPSE_RANGE,
                                  os.O_RDWR), ("f", INSERT_RANGE, os.O_RDWR),
                                  ("low_ro", COLLAPSE_RANGE, os.O_WRONLY | os.O_APPEND)):
            fd = os.open(mnt / name, flags)
            try:
                got.append((outcome(fallocate, fd, mode, 8192, 8192), os.fstat(fd).st_size))
            finally:
                os.close(fd)
            got.append((mnt / name).read_bytes() == PATTERN)
        return got

    with both(tmp_path, ()) as mounts:
        results = {name: steps(ly.mnt) for name, ly in mounts.items()}
    assert results["kernel"] == [("ok", SIZE - 8192), False, ("ok", SIZE - 8192), False,
                                 ("ok", SIZE), False, ("ok", SIZE - 8192), False]
    if results["overlayfuse"] != results["kernel"]:
        assert results["overlayfuse"] == [(NOTSUP, SIZE), True] * 4


@pytest.mark.skipif(_has_handler(), reason=(
    "this pyfuse3 has the fallocate handler: the stock-binding behaviour is for a venv "
    "without tools/pyfuse3/fallocate.patch"))
def test_without_the_handler_fallocate_is_eopnotsupp(tmp_path: Path) -> None:
    """Stock pyfuse3 (or a build without the fourth patch): libfuse answers ENOSYS, callers
    get EOPNOTSUPP, and the mount goes on working."""
    layers = make_layers(tmp_path, 1)
    (layers.lowers[0] / "low").write_bytes(PATTERN)
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt) as dm:
        fd = os.open(layers.mnt / "low", os.O_RDWR)
        try:
            got = [outcome(fallocate, fd, mode, 0, 4096) for mode in (0, KEEP_SIZE,
                   PUNCH_HOLE | KEEP_SIZE)]
            os.pwrite(fd, b"still", 0)
        finally:
            os.close(fd)
        assert dm.alive()
        assert (layers.mnt / "low").read_bytes()[:5] == b"still"
    assert got == [NOTSUP] * 3
