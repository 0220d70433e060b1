"""Concurrent load on one FUSE mount: 8 processes of mixed operations (tests/load.py).

It must hold: no operation fails in a way the kernel's overlayfs would not (each worker's log
is replayed on a kernel overlay over the same lowers, outcome by outcome, and the final trees
are compared), no ESTALE/EIO in the shared dir, no hang (a watchdog fails the test when no
worker makes progress), the lowers untouched, and afterwards the daemon holds no more file
descriptors on files than when idle and, once the kernel has forgotten its inodes, about its
idle memory.  OVERLAYFUSE_LOAD_SECONDS sets the length (.ci/run: the full 60 s).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import stat
import time
from pathlib import Path

import pytest

from load import SHARED, build_layers, replay, worker
from mounts import Layers, kernel_overlay, make_layers, overlayfuse_mount
from ops import diff_snapshots, raw_tree, snapshot_tree

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays and drop_caches "
                                 "need root"), pytest.mark.slow]
log = logging.getLogger(__name__)

WORKERS = 8
SECONDS = float(os.environ.get("OVERLAYFUSE_LOAD_SECONDS", "15"))
STALL = 30.0              # no worker made progress for this long: a hang
RSS_SLACK = 32 << 20      # after the load and drop_caches, RSS within this of idle


def file_fds(pid: int) -> int:
    """Descriptors of ``pid`` on regular files (dirs, /dev/fuse, pipes not counted)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                n += 1
        except OSError:
            pass
    return n


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def settle(pid: int) -> tuple[int, int]:
    """(file fds, RSS kB) once the kernel forgot what it can: releases and FORGETs are async."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    last = None
    for _ in range(20):
        time.sleep(0.25)
        now = (file_fds(pid), status_kb(pid, "VmRSS"))
        if now == last:
            break
        last = now
    return now


def run_workers(mnt: Path, out: Path) -> list[tuple[list, list]]:
    """Start the workers, fail on a stall, return each one's (log, unexpected)."""
    mp = multiprocessing.get_context("fork")
    progress = mp.Array("q", WORKERS, lock=False)
    procs = [mp.Process(target=worker, args=(str(mnt), n, SECONDS, 1, str(out / f"w{n}"),
                                             progress)) for n in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        seen, since = list(progress), time.monotonic()
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            if list(progress) != seen:
                seen, since = list(progress), time.monotonic()
            elif time.monotonic() - since > STALL:
                pytest.fail(f"hang: no worker progressed for {STALL:.0f}s (ops so far {seen})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    results = []
    for n in range(WORKERS):
        with open(out / f"w{n}", "rb") as f:
            results.append(pickle.load(f))
    return results


def test_mixed_load(tmp_path: Path, layers: Layers) -> None:
    build_layers(layers.lowers, WORKERS)
    pristine = [raw_tree(l) for l in layers.lowers]
    (layers.upper / SHARED).mkdir()
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt) as dm:
        fds_idle, rss_idle = settle(dm.pid)
        results = run_workers(layers.mnt, tmp_path)
        fds_after, rss_after = settle(dm.pid)
        peak = status_kb(dm.pid, "VmHWM")
        fuse_trees = [snapshot_tree(layers.mnt / f"p{n}") for n in range(WORKERS)]
    ops_run = sum(len(r[0]) for r in results)
    log.warning("load: %d private ops + shared ops over %.0fs; daemon file fds %d -> %d, "
                "RSS %d -> %d kB (peak %d kB)", ops_run, SECONDS, fds_idle, fds_after,
                rss_idle, rss_after, peak)
    unexpected = [f"p{n}: {op!r} -> {res!r}" for n, r in enumerate(results) for op, res in r[1]]
    assert not unexpected, "shared dir: errnos no order gives:\n" + "\n".join(unexpected[:20])
    assert [raw_tree(l) for l in layers.lowers] == pristine, "a lower layer changed"
    assert fds_after <= fds_idle, f"daemon holds {fds_after} file fds, {fds_idle} when idle"
    assert rss_after <= rss_idle + RSS_SLACK // 1024, \
        f"daemon RSS {rss_after} kB after the load, {rss_idle} kB idle"

    kernel = make_layers(tmp_path / "kernel")
    (kernel.upper / SHARED).mkdir()
    with kernel_overlay(layers.lowers, kernel.upper, kernel.work, kernel.mnt):
        diffs = [d for n, (ops_log, _) in enumerate(results)
                 for d in replay(str(kernel.mnt), n, ops_log)]
        assert not diffs, "outcomes differ from the kernel's:\n" + "\n".join(diffs)
        for n in range(WORKERS):
            tree_diffs = diff_snapshots(snapshot_tree(kernel.mnt / f"p{n}"), fuse_trees[n],
                                        "kernel", "overlayfuse")
            assert not tree_diffs, f"p{n} differs:\n" + "\n".join(tree_diffs[:20])
