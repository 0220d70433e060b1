"""Zero-message opens (fusefs/transport.py, inofiles.py): files named by inode, fds bounded.

With our patched pyfuse3 and ``-o zero_opens`` the daemon answers OPEN and OPENDIR with
ENOSYS, so the kernel never tells it that a file is open or closed.  What that must not break: a file unlinked while open
(its data lives on in the daemon's pinned fd), ``open(O_TRUNC)`` (sent as a setattr), a
reader that opened the file before its copy-up, listings after changes, and the daemon's
fd count (bounded by a share of its fd limit, back to idle once the kernel forgets).  Each
runs in both modes: zero-message (where the binding is patched) and classic.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from mounts import overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root here")


def _patched() -> bool:
    from overlayfuse.fusefs import transport
    return transport.patched()


MODES = [pytest.param("zero", marks=pytest.mark.skipif(not _patched(), reason=(
    "stock pyfuse3: zero-message opens need the patched binding (tools/setup.sh)"))),
    "classic"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """"zero": every mount of the test with zero-message file opens (as -o zero_opens gives),
    "classic": none of the zero-message modes."""
    monkeypatch.setenv("OVERLAYFUSE_OPENS", request.param)
    return request.param


def _layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    low, up, work, mnt = (tmp_path / n for n in ("l", "u", "w", "m"))
    for d in (low, up, work, mnt):
        d.mkdir()
    (low / "lower").write_bytes(b"lower data\n")
    (low / "d").mkdir()
    for i in range(300):
        (low / "d" / f"f{i}").write_bytes(b"%d\n" % i)
    return low, up, work, mnt


def _file_fds(pid: int) -> int:
    """The daemon's open fds on regular files (not dirs, pipes, /dev/fuse)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and os.path.isfile(target.split(" (deleted)")[0]):
            n += 1
    return n


def test_the_daemon_says_which_mode_it_uses(mode: str, tmp_path: Path) -> None:
    low, up, work, mnt = _layers(tmp_path)
    r = subprocess.run(["overlayfuse", "mount", "-v", "--backend", "fuse", "-o",
                        f"lowerdir={low},upperdir={up},workdir={work}", str(mnt)],
                       capture_output=True, text=True, env=os.environ)
    try:
        assert r.returncode == 0, r.stderr
        want = "zero-message opens" if mode == "zero" else "classic opens"
        assert f"fuse transport: {want}" in r.stderr
    finally:
        subprocess.run(["overlayfuse", "umount", str(mnt)], capture_output=True)


@pytest.mark.skipif(not _patched(), reason="stock pyfuse3: the modes need the patched binding")
@pytest.mark.parametrize("extra, want", [
    ("", "kernel-cached listings, classic file opens"),
    (",zero_opens", "zero-message opens and kernel-cached listings")])
def test_listings_are_cached_by_default_and_file_opens_on_request(
        extra: str, want: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default only directories are zero-message (a lower file is copied up at an open for
    write, as by the kernel); ``-o zero_opens`` makes file opens zero-message too."""
    monkeypatch.delenv("OVERLAYFUSE_OPENS", raising=False)
    low, up, work, mnt = _layers(tmp_path)
    r = subprocess.run(["overlayfuse", "mount", "-v", "--backend", "fuse", "-o",
                        f"lowerdir={low},upperdir={up},workdir={work}{extra}", str(mnt)],
                       capture_output=True, text=True)
    try:
        assert r.returncode == 0, r.stderr
        assert f"fuse transport: {want}" in r.stderr
        os.close(os.open(mnt / "lower", os.O_WRONLY))
        assert (up / "lower").exists() == (not extra)
        assert len(os.listdir(mnt / "d")) == 300
    finally:
        subprocess.run(["overlayfuse", "umount", str(mnt)], capture_output=True)


def test_open_files_outlive_their_names(mode: str, tmp_path: Path) -> None:
    low, up, work, mnt = _layers(tmp_path)
    with overlayfuse_mount([low], up, work, mnt):
        ro = os.open(mnt / "lower", os.O_RDONLY)
        (mnt / "new").write_bytes(b"new data")
        rw = os.open(mnt / "new", os.O_RDWR)
        os.unlink(mnt / "lower")
        os.unlink(mnt / "new")
        assert os.pread(ro, 100, 0) == b"lower data\n"
        assert os.fstat(ro).st_nlink == 1  # the lower file's own count, as on the kernel's
        assert os.fstat(rw).st_nlink == 0
        os.pwrite(rw, b"NEW", 0)
        os.ftruncate(rw, 5)
        assert os.pread(rw, 100, 0) == b"NEW d"
        assert os.fstat(rw).st_size == 5
        os.close(ro)
        os.close(rw)
        assert sorted(os.listdir(mnt)) == ["d"]
    assert (low / "lower").read_bytes() == b"lower data\n"


def test_truncating_open_and_a_reader_from_before_the_copy_up(mode: str, tmp_path: Path) -> None:
    low, up, work, mnt = _layers(tmp_path)
    with overlayfuse_mount([low], up, work, mnt):
        reader = os.open(mnt / "lower", os.O_RDONLY)
        assert os.pread(reader, 5, 0) == b"lower"
        fd = os.open(mnt / "lower", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"copied")
        os.close(fd)
        assert os.pread(reader, 100, 0) == b"copied"  # the rpm problem, solved
        os.close(reader)
        fd = os.open(mnt / "lower", os.O_WRONLY | os.O_TRUNC)  # now an upper file
        os.close(fd)
        assert (mnt / "lower").read_bytes() == b""
        (mnt / "d" / "f1").unlink()
        os.rename(mnt / "d" / "f2", mnt / "d" / "g2")
        (mnt / "d" / "h").write_bytes(b"")
        names = set(os.listdir(mnt / "d"))
        assert {"g2", "h"} <= names and not {"f1", "f2"} & names and len(names) == 300
    assert (up / "lower").read_bytes() == b"" and (low / "lower").read_bytes() == b"lower data\n"


def test_backing_fds_stay_bounded_and_go_when_forgotten(mode: str, tmp_path: Path) -> None:
    """Started with an fd limit of 256 the daemon keeps at most 64 backing fds (a quarter),
    however many files are read, and none once the kernel has forgotten the inodes."""
    low, up, work, mnt = _layers(tmp_path)
    r = subprocess.run(["prlimit", "--nofile=256:256", "overlayfuse", "mount", "-v",
                        "--backend", "fuse", "-o", f"lowerdir={low},upperdir={up},workdir={work}",
                        str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pid = int(r.stderr.rsplit("daemon pid ", 1)[1].split(")")[0])
    try:
        idle = _file_fds(pid)
        most = 0
        for _round in range(2):
            for i in range(300):
                fd = os.open(mnt / "d" / f"f{i}", os.O_RDONLY)
                assert os.read(fd, 10) == b"%d\n" % i
                os.close(fd)
                if i % 50 == 0:
                    most = max(most, _file_fds(pid))
        busy = _file_fds(pid)
        forgotten = busy
        for _ in range(50):  # FORGETs reach the daemon a little after the kernel drops inodes
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")
            forgotten = _file_fds(pid)
            if forgotten == idle:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["overlayfuse", "umount", str(mnt)], capture_output=True)
    assert max(most, busy) - idle <= (64 if mode == "zero" else 1), (idle, most, busy)
    assert forgotten == idle, (idle, busy, forgotten)
