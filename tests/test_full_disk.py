"""A full upper filesystem: what does not fit fails with ENOSPC and changes nothing.

The upper and work dirs live on a small tmpfs or a small ext4 image on a loop device (out of
blocks, or out of inodes) mounted in the test's tmp dir.  The same steps run on the kernel's overlayfs and on overlayfuse, and both must
give the same answers: a new file and a copy-up that do not fit fail with ENOSPC, the merged
view is what it was before the failing operation (the lower file still whole, no half whiteout
shown), no temp file stays in the work dir, and once space is freed the mount works again.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import force_unmount, kernel_overlay, overlayfuse_mount, tree_snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tmpfs and kernel overlays need root")

MIB = 1 << 20
BIG = b"lower data " * (3 * MIB // 11)  # ~3 MiB: more than the 2 MiB upper holds


@contextlib.contextmanager
def small_fs(path: Path, kind: str, inodes: int | None = None) -> Iterator[Path]:
    """A 2 MiB tmpfs, or a 3 MiB ext4 image on a loop device (journal, reserved blocks that
    root may use), with few inodes if asked; unmounted whatever happens."""
    path.mkdir()
    if kind == "tmpfs":
        opts = "size=2m" + (f",nr_inodes={inodes}" if inodes else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "ovf-full", str(path)], check=True)
    else:
        image = path.with_suffix(".img")
        image.write_bytes(b"")
        os.truncate(image, 3 * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(inodes or 256), str(image)],
                       check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


def _errno(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def _write(path: Path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


def _mount(which: str, lower: Path, upper: Path, work: Path, mnt: Path):
    if which == "kernel":
        return kernel_overlay([lower], upper, work, mnt)
    return overlayfuse_mount([lower], upper, work, mnt)


def _work_temps(work: Path) -> list[str]:
    return [n for n in os.listdir(work / "work")] if (work / "work").exists() else []


@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
@pytest.mark.parametrize("which", ["kernel", "overlayfuse"])
def test_out_of_blocks(tmp_path: Path, which: str, fs: str) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(BIG)
    (lower / "keep").write_bytes(b"keep\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with small_fs(tmp_path / "fs", fs) as root:
        upper, work = root / "upper", root / "work"
        upper.mkdir()
        work.mkdir()
        with _mount(which, lower, upper, work, mnt):
            m = mnt
            before = tree_snapshot(m)
            # a copy-up that does not fit: the lower file stays whole in the merged view
            assert _errno(_write, m / "big", b"X", "r+b") == "ENOSPC"
            assert (m / "big").read_bytes() == BIG
            assert tree_snapshot(m) == before
            assert _work_temps(work) == []
            # a new file that does not fit: ENOSPC, then freeing space makes writes work again
            assert _errno(_write, m / "new", BIG) == "ENOSPC"
            os.unlink(m / "new")
            assert tree_snapshot(m) == before
            _write(m / "small", b"fits\n")
            assert (m / "small").read_bytes() == b"fits\n"
            _write(m / "keep", b"changed\n", "ab")
            assert (m / "keep").read_bytes() == b"keep\nchanged\n"
        assert (upper / "keep").read_bytes() == b"keep\nchanged\n"
        assert not (upper / "big").exists(), "a partial copy-up reached the upper"


@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
@pytest.mark.parametrize("which", ["kernel", "overlayfuse"])
def test_out_of_inodes(tmp_path: Path, which: str, fs: str) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    for i in range(4):
        (lower / f"f{i}").write_bytes(b"lower %d\n" % i)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with small_fs(tmp_path / "fs", fs, inodes=16 if fs == "tmpfs" else 32) as root:
        upper, work = root / "upper", root / "work"
        upper.mkdir()
        work.mkdir()
        with _mount(which, lower, upper, work, mnt):
            n = 0
            while _errno(_write, mnt / f"fill{n}", b"") == "ok":
                n += 1
                assert n < 64, "tmpfs nr_inodes did not limit the creates"
            before = tree_snapshot(mnt)
            # removing a lower file needs a whiteout (an inode): it must fail whole
            assert _errno(os.unlink, mnt / "f0") == "ENOSPC"
            assert (mnt / "f0").read_bytes() == b"lower 0\n"
            assert tree_snapshot(mnt) == before
            assert _errno(os.mkdir, mnt / "d") == "ENOSPC"
            assert _work_temps(work) == []
            for i in range(n):
                os.unlink(mnt / f"fill{i}")
            os.unlink(mnt / "f0")
            assert not (mnt / "f0").exists()
            os.mkdir(mnt / "d")
            assert sorted(os.listdir(mnt)) == ["d", "f1", "f2", "f3"]
