"""A power cut right after copy-ups: each upper file is the whole copy, never a short one.

The upper is a journalled ext4 on a loop device, where copy-ups are made durable with
``sync_file_range`` instead of fsync (fusefs/durable.py: the journal orders the rename after
the copy's data and metadata).  The power cut is ext4's shutdown ioctl without a log flush
(xfstests' "godown"): what was not written before it is lost, and the next mount replays only
the committed journal.  An fsync of an unrelated file first commits the journal, renames
included, so every copy-up's rename survives: without the data being written before the
rename, the renamed files come back empty (delayed allocation: their blocks were never
allocated when the rename was committed).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import REPO, force_unmount, is_mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")

FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
NOLOGFLUSH = 2  # neither data nor the journal is flushed: a power cut
FILES = 150


def _content(i: int) -> bytes:
    return (b"lower file %d " % i) * (20000 // 14 + i)  # about 20-30 KiB, each its own


@contextlib.contextmanager
def _ext4(image: Path, path: Path, journal: bool = True) -> Iterator[None]:
    """An ext4 image mounted on a loop device at ``path``; unmounted whatever happens."""
    if not image.exists():
        image.write_bytes(b"")
        os.truncate(image, 64 << 20)
        features = [] if journal else ["-O", "^has_journal"]
        subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield
    finally:
        force_unmount(path)


def _shutdown(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", NOLOGFLUSH))
    finally:
        os.close(fd)


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not is_mounted(mnt):
        assert proc.poll() is None, "the daemon exited before mounting"
        assert time.monotonic() < deadline, "the daemon did not mount in 20 s"
        time.sleep(0.05)


def test_durability_mode_by_upper_filesystem(tmp_path: Path) -> None:
    """Journalled ext4: sync_file_range; ext4 without a journal: fsync; tmpfs: nothing."""
    from overlayfuse.fusefs import durable
    cases = [("journal", True, durable.RANGE), ("nojournal", False, durable.FSYNC)]
    for name, journal, want in cases:
        with _ext4(tmp_path / f"{name}.img", tmp_path / name, journal):
            fd = os.open(tmp_path / name, os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert durable.mode_of(fd) == want, name
            finally:
                os.close(fd)
    shm = os.open("/dev/shm", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert durable.mode_of(shm) == durable.NONE
    finally:
        os.close(shm)


@pytest.mark.parametrize("forced", ["", "fsync"], ids=["sync_file_range", "fsync"])
def test_copy_ups_survive_a_power_cut(tmp_path: Path, forced: str) -> None:
    """Both ways a journalled upper can be made durable: its own (sync_file_range) and the
    fsync every other upper gets (forced with OVERLAYFUSE_COPY_SYNC=fsync)."""
    image, fs, mnt = tmp_path / "fs.img", tmp_path / "fs", tmp_path / "mnt"
    mnt.mkdir()
    with _ext4(image, fs):
        lower, upper, work = fs / "lower", fs / "upper", fs / "work"
        for d in (lower, upper, work):
            d.mkdir()
        for i in range(FILES):
            (lower / f"f{i}").write_bytes(_content(i))
        os.sync()  # the lowers are on disk before the cut
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        env = dict(os.environ, PYTHONPATH=str(REPO), OVERLAYFUSE_COPY_SYNC=forced)
        proc = subprocess.Popen([sys.executable, "-m", "overlayfuse", "mount", "--backend",
                                 "fuse", "-f", "-o", opts, str(mnt)], env=env,
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_mounted(mnt, proc)
            for i in range(FILES):  # each open for append is a copy-up
                fd = os.open(mnt / f"f{i}", os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"!")
                os.close(fd)
            marker = os.open(fs / "marker", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(marker, b"x")
            os.fsync(marker)  # commits the journal: every rename so far is in it
            os.close(marker)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _shutdown(fs)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            force_unmount(mnt)
    with _ext4(image, fs):  # the journal is replayed
        copied = sorted(int(n[1:]) for n in os.listdir(fs / "upper"))
        assert copied == list(range(FILES)), "the committed renames must all be there"
        for i in copied:
            data, want = (fs / "upper" / f"f{i}").read_bytes(), _content(i)
            # the append after the copy-up was never synced: it may be lost, or its size
            # kept without its byte (ext4 then reads a zero), as on any filesystem
            assert data[:len(want)] == want and data[len(want):] in (b"", b"!", b"\0"), \
                f"f{i}: {len(data)} bytes after the power cut, not the whole copy"
