"""Daemon memory on a huge tree (issues 11 and 12): a walk keeps it bounded per entry.

The kernel keeps every entry of a walked tree cached (entry timeouts of a day), so the daemon
must keep a node id for each one; what it keeps per entry is the figure that counts.  A walk
of 200,000 entries over two lowers, in the default mode and with zero-message file opens:

- the daemon's peak RSS (VmHWM, so a big list built and freed during the walk counts too)
  grows by less than BYTES_PER_ENTRY per entry walked;
- it holds no more descriptors on files than when idle, and its directory descriptors stay
  within one per backing directory (layers.DirFds, bounded);
- walks repeated after the kernel forgot the entries (drop_caches sends the FORGETs) stay
  under the same bound.  They may peak higher than the first (glibc keeps the freed arrays'
  pages, in holes, and the next walk fills others: 90-215 B/entry measured here, varying from
  run to run) but do not keep growing; a node or a name kept per entry and walk crosses the
  bound by the last one.  That FORGET frees a cold entry is tested on the table itself
  (test_inodes.py).
"""
from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from mounts import make_layers, overlayfuse_mount

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root"),
              pytest.mark.slow]
log = logging.getLogger(__name__)

DIRS = 100                  # per lower, the same names in both: merged dirs
PER_DIR = 1000              # files per dir and lower (other names in each lower)
ENTRIES = DIRS + 2 * DIRS * PER_DIR
# Measured here (2 lowers, 200,000 entries): 85-140 B/entry of peak growth on the first walk,
# most of it the bounded caches filling (lower names, dir fds) and allocator slack; the
# marginal cost is ~60 B/entry at 1,000,000 entries.  A node object per entry, as before
# inodes.ColdChildren, cost ~660 B/entry.
BYTES_PER_ENTRY = 300


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _fds(pid: int) -> tuple[int, int]:
    """(descriptors on regular files, on directories) held by ``pid``."""
    files = dirs = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            mode = os.stat(f"/proc/{pid}/fd/{fd}").st_mode
        except OSError:
            continue
        files += stat.S_ISREG(mode)
        dirs += stat.S_ISDIR(mode)
    return files, dirs


def _fds_within(pid: int, files_max: int, dirs_max: int) -> tuple[int, int]:
    """``_fds`` once within the bounds, or after 5 s: with classic opens a directory handle
    holds its fd until RELEASEDIR, which the kernel sends in the background after close(2),
    so the walk's last handles may still be on their way when the walk returns."""
    deadline = time.monotonic() + 5
    while True:
        files, dirs = _fds(pid)
        if (files <= files_max and dirs <= dirs_max) or time.monotonic() > deadline:
            return files, dirs
        time.sleep(0.02)


def _settle(pid: int) -> int:
    """RSS (kB) once it stops moving: FORGETs arrive asynchronously."""
    last = -1
    for _ in range(40):
        time.sleep(0.25)
        now = _status_kb(pid, "VmRSS")
        if now == last:
            break
        last = now
    return now


def _walk(root: Path) -> int:
    """lstat every entry below ``root``, as find does; the number of entries."""
    n, stack = 0, [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = os.lstat(entry.path)
                n += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return n


@pytest.fixture(scope="module")
def huge_lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("huge")
    lowers = make_layers(base).lowers
    for li, low in enumerate(lowers):
        names = [f"{'ab'[li]}{k:04d}" for k in range(PER_DIR)]
        for d in range(DIRS):
            path = low / f"d{d:03d}"
            path.mkdir()
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name in names:
                    os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=dfd)
            finally:
                os.close(dfd)
    return lowers


@pytest.mark.parametrize("extra", [[], ["zero_opens"]], ids=["default", "zero_opens"])
def test_walking_a_huge_tree_keeps_memory_bounded(huge_lowers: list[Path], tmp_path: Path,
                                                  extra: list[str]) -> None:
    layers = make_layers(tmp_path, 0)
    with overlayfuse_mount(huge_lowers, layers.upper, layers.work, layers.mnt,
                           extra=extra) as dm:
        idle = _settle(dm.pid)
        files_idle, dirs_idle = _fds(dm.pid)
        assert _walk(layers.mnt) == ENTRIES
        peak = _status_kb(dm.pid, "VmHWM")
        files, dirs = _fds_within(dm.pid, files_idle, dirs_idle + len(huge_lowers) * DIRS)
        per_entry = (peak - idle) * 1024 / ENTRIES
        log.warning("walk of %d entries: idle %d kB, peak %d kB: %.0f B/entry; fds on files "
                    "%d -> %d, on dirs %d -> %d", ENTRIES, idle, peak, per_entry, files_idle,
                    files, dirs_idle, dirs)
        assert per_entry < BYTES_PER_ENTRY
        assert files == files_idle
        assert dirs <= dirs_idle + len(huge_lowers) * DIRS

        for _ in range(2):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")  # the kernel forgets the entries: FORGET frees them here
            _settle(dm.pid)
            assert _walk(layers.mnt) == ENTRIES
            peak = _status_kb(dm.pid, "VmHWM")
            log.warning("walk after drop_caches: peak %d kB: %.0f B/entry", peak,
                        (peak - idle) * 1024 / ENTRIES)
            assert (peak - idle) * 1024 / ENTRIES < BYTES_PER_ENTRY
        assert _fds(dm.pid)[0] == files_idle
