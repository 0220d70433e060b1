"""Direct, asynchronous, buffered and mmap I/O on the same files at once: no hang.

xfstests generic/095 runs fio with O_DIRECT readers and writers (sync, libaio, splice),
buffered writers and mmap writers (one with the file opened O_DIRECT) on two files.  On
overlayfuse it deadlocked the mount: each direct write waited, before its reply, for the kernel
to drop the pages it made stale, and the kernel waited for page locks held by readahead and
writeback requests that could not be sent while the unanswered direct writes held the
connection's background slots.  Here the same mix runs for a few seconds on a kernel overlay
and on overlayfuse: every worker must finish without an error (EIO aside, which the kernel
gives too), and a watchdog aborts the FUSE connection (so that the mount can be cleaned up) and
fails the test when one does not.
"""
from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import aio_pwrite
from mounts import kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root")

SIZE = 1 << 20
BLOCK = 8192
SECONDS = 4.0
WATCHDOG = 60.0
# (kind, processes, threads per process): about 30 direct requests in flight at once, more
# than the kernel's 12 background slots of a FUSE connection
MIX = [("direct", 3, 8), ("aio", 2, 1), ("buffered", 2, 1), ("mmap", 2, 1),
       ("mmap-direct", 2, 1)]


def _direct(path: str, rnd: random.Random, deadline: float) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCK) as buf:  # O_DIRECT wants an aligned buffer
            buf.write(bytes([rnd.randrange(256)]) * BLOCK)
            while time.monotonic() < deadline:
                os.pwrite(fd, buf, rnd.randrange(SIZE // BLOCK) * BLOCK)
                os.preadv(fd, [buf], rnd.randrange(SIZE // BLOCK) * BLOCK)
    finally:
        os.close(fd)


def _aio(path: str, rnd: random.Random, deadline: float) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCK) as buf:
            buf.write(b"a" * BLOCK)
            while time.monotonic() < deadline:
                if aio_pwrite(fd, buf, rnd.randrange(SIZE // BLOCK) * BLOCK) != BLOCK:
                    raise OSError(errno.EIO, "short aio write")
    finally:
        os.close(fd)


def _buffered(path: str, rnd: random.Random, deadline: float) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        while time.monotonic() < deadline:
            off = rnd.randrange(SIZE // BLOCK) * BLOCK
            os.pread(fd, 4 * BLOCK, off)  # sequential enough for readahead
            os.pwrite(fd, b"b" * 1024, off + 512)
    finally:
        os.close(fd)


def _mmap(path: str, rnd: random.Random, deadline: float, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDWR | flags)
    try:
        with mmap.mmap(fd, SIZE) as m:
            n = 0
            while time.monotonic() < deadline:
                off = rnd.randrange(SIZE // 1024) * 1024
                m[off:off + 1024] = b"m" * 1024
                n += 1
                if n % 16 == 0:
                    m.flush()
    finally:
        os.close(fd)


def _mmap_direct(path: str, rnd: random.Random, deadline: float) -> None:
    """fio's mmap engine with direct=1: the pages' writeback then comes with the file handle of
    an O_DIRECT open."""
    _mmap(path, rnd, deadline, os.O_DIRECT)


KINDS = {"direct": _direct, "aio": _aio, "buffered": _buffered, "mmap": _mmap,
         "mmap-direct": _mmap_direct}


def _worker(paths: list[str], kind: str, threads: int, seed: int,
            results: "multiprocessing.Queue[str]") -> None:
    deadline = time.monotonic() + SECONDS
    errors: list[str] = []

    def run(i: int) -> None:
        rnd = random.Random(seed * 100 + i)
        while time.monotonic() < deadline:
            try:
                KINDS[kind](paths[i % len(paths)], rnd, deadline)
            except OSError as e:
                # EIO is the kernel's answer when a direct write cannot drop a page an mmap
                # writer dirtied meanwhile (dio_warn_stale_pagecache), on any filesystem;
                # fio runs generic/095 with --ignore_error=,EIO for that reason
                if e.errno != errno.EIO:
                    errors.append(f"{kind}: {errno.errorcode.get(e.errno or 0, e)}")
                    return

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put(";".join(errors) or "ok")


def _abort_fuse(dev: int) -> None:
    """Abort the FUSE connection of device *dev* (if it is one), so that a hung mount can be
    unmounted."""
    conns = Path("/sys/fs/fuse/connections")
    if not any(conns.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "none", str(conns)], check=False)
    abort = conns / str(os.minor(dev)) / "abort"
    if os.major(dev) == 0 and abort.exists():
        abort.write_text("1")


def _run_mix(mnt: Path) -> list[str]:
    dev = os.stat(mnt).st_dev  # before the run: a hung mount would hang a stat too
    paths = []
    for name in ("file1", "file2"):
        (mnt / name).write_bytes(b"\0" * SIZE)
        paths.append(str(mnt / name))
    ctx = multiprocessing.get_context("fork")
    results: "multiprocessing.Queue[str]" = ctx.Queue()
    workers = [(kind, threads) for kind, n, threads in MIX for _ in range(n)]
    procs = [ctx.Process(target=_worker, args=(paths, kind, threads, seed, results))
             for seed, (kind, threads) in enumerate(workers)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WATCHDOG
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    if hung:
        _abort_fuse(dev)
        for p in hung:
            p.kill()
            p.join(10)
        return [f"{len(hung)} workers hung"]
    return sorted(results.get(timeout=5) for _ in procs)


def test_direct_aio_buffered_and_mmap_io_together_finish(tmp_path: Path) -> None:
    expected = ["ok"] * sum(n for _, n, _ in MIX)
    k = make_layers(tmp_path / "k", 1)
    with kernel_overlay(k.lowers, k.upper, k.work, k.mnt, "redirect_dir=on,index=on"):
        assert _run_mix(k.mnt) == expected
    f = make_layers(tmp_path / "f", 1)
    with overlayfuse_mount(f.lowers, f.upper, f.work, f.mnt):
        assert _run_mix(f.mnt) == expected
