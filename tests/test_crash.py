"""SIGKILL the daemon in the middle of namespace work, then mount again over the dead mount.

Each scenario runs a workload on a background mount, kills the daemon at a random moment
while it works, and mounts again on the same mount point with no manual step (the dead mount,
"Transport endpoint is not connected", is cleared by ``overlayfuse mount`` itself).  Then every
entry must be in its old state or its new one, no temporary file may show, the work dir's
leftovers are gone, the lowers are byte for byte unchanged, and the kernel's overlayfs on the
same upper and work dir shows the same tree as the new FUSE mount.  (The big copy-up case is
test_daemon.py::test_sigkill_during_copy_up_leaves_old_or_new_state.)
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from mounts import Layers, is_mounted, kernel_overlay, tree_snapshot, wait_gone
from ops import raw_tree
from test_daemon import cleanup, cli, daemon_pids, opts

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root"),
              pytest.mark.slow]

DIRS, FILES = 150, 3
DATA = b"0123456789abcdef" * 4096  # 64 KiB


def _content(i: int, j: int) -> bytes:
    return f"dir {i} file {j}\n".encode() * 50


def lower_dirs(lower: Path) -> None:
    for i in range(DIRS):
        d = lower / f"d{i}"
        d.mkdir()
        for j in range(FILES):
            (d / f"f{j}").write_bytes(_content(i, j))


def lower_tree(lower: Path) -> None:
    for i in range(DIRS):
        d = lower / "t" / f"s{i}"
        d.mkdir(parents=True)
        for j in range(FILES):
            (d / f"f{j}").write_bytes(_content(i, j))


def lower_links(lower: Path) -> None:
    for i in range(DIRS):
        (lower / f"a{i}").write_bytes(DATA)
        os.link(lower / f"a{i}", lower / f"b{i}")


# Each workload prints "go" once it has started (in the loops: after the number of steps given
# as its second argument, so the kill falls in the middle however fast the daemon is), then
# works until done or killed.
WORKLOADS = {
    "rename-lower-dirs": (lower_dirs, f"""
for i in range({DIRS}):
    os.rename(f"{{m}}/d{{i}}", f"{{m}}/r{{i}}")
    go()"""),
    "create-with-data": (None, f"""
for i in range({DIRS}):
    with open(f"{{m}}/n{{i}}", "wb") as f:
        f.write({DATA!r})
    go()"""),
    "rm-rf-lower-tree": (lower_tree, """
go()
shutil.rmtree(f"{m}/t")"""),
    "hard-link-copy-up": (lower_links, f"""
for i in range({DIRS}):
    with open(f"{{m}}/a{{i}}", "ab") as f:
        f.write(b"X")
    go()"""),
}
PRELUDE = """import os, shutil, sys
m, steps = sys.argv[1], int(sys.argv[2])
def go():
    global steps
    steps -= 1
    if steps == 0:
        print("go", flush=True)
"""


def check_renamed(mnt: Path) -> None:
    for i in range(DIRS):
        there = [n for n in (f"d{i}", f"r{i}") if (mnt / n).exists()]
        assert len(there) == 1, f"dir {i}: {there}"
        d = mnt / there[0]
        assert sorted(os.listdir(d)) == [f"f{j}" for j in range(FILES)], d
        for j in range(FILES):
            assert (d / f"f{j}").read_bytes() == _content(i, j)


def check_created(mnt: Path) -> None:
    for i in range(DIRS):
        p = mnt / f"n{i}"
        if p.exists():
            data = p.read_bytes()
            assert DATA.startswith(data), f"{p}: not a prefix of what was written"


def check_removed(mnt: Path) -> None:
    if not (mnt / "t").exists():
        return
    for sub in os.listdir(mnt / "t"):
        i = int(sub[1:])
        for name in os.listdir(mnt / "t" / sub):
            assert (mnt / "t" / sub / name).read_bytes() == _content(i, int(name[1:]))


def check_links(mnt: Path) -> None:
    for i in range(DIRS):
        a, b = os.stat(mnt / f"a{i}"), os.stat(mnt / f"b{i}")
        assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), f"a{i}/b{i} are no longer one inode"
        data = (mnt / f"b{i}").read_bytes()
        assert data in (DATA, DATA + b"X") and (mnt / f"a{i}").read_bytes() == data


CHECKS: dict[str, Callable[[Path], None]] = {
    "rename-lower-dirs": check_renamed, "create-with-data": check_created,
    "rm-rf-lower-tree": check_removed, "hard-link-copy-up": check_links,
}


def mount_background(layers: Layers) -> int:
    r = cli("mount", "--backend", "fuse", "-o", opts(layers), str(layers.mnt))
    assert r.returncode == 0, r.stderr
    pids = daemon_pids(layers.mnt)
    assert len(pids) == 1, pids
    return pids[0]


def kill_while_working(layers: Layers, script: str, rng: random.Random) -> None:
    pid = mount_background(layers)
    steps = rng.randint(1, DIRS // 2) if "for i in" in script else 1
    worker = subprocess.Popen([sys.executable, "-c", PRELUDE + script, str(layers.mnt),
                               str(steps)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "go\n"
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
    finally:
        worker.wait(20)
    assert worker.returncode != 0, "the workload was done before the daemon was killed"


def temp_names(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if n.startswith("#ovf")]


@pytest.mark.parametrize("scenario", sorted(WORKLOADS))
def test_sigkill_mid_operation(layers: Layers, scenario: str) -> None:
    build, script = WORKLOADS[scenario]
    if build is not None:
        build(layers.lowers[0])
    pristine = [raw_tree(l) for l in layers.lowers]
    rng = random.Random(scenario)
    with cleanup(layers.mnt):
        kill_while_working(layers, script, rng)
        assert is_mounted(layers.mnt), "the killed daemon's mount should still be there"
        with pytest.raises(OSError):
            os.listdir(layers.mnt)  # ENOTCONN: the dead mount the next mount must clear
        mount_background(layers)
        assert os.listdir(layers.work / "work") == [], "work dir leftovers were kept"
        CHECKS[scenario](layers.mnt)
        assert temp_names(layers.mnt) == [] and temp_names(layers.upper) == []
        merged = tree_snapshot(layers.mnt)
        r = cli("umount", str(layers.mnt))
        assert r.returncode == 0, r.stderr
    assert [raw_tree(l) for l in layers.lowers] == pristine, "a lower layer changed"
    with kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt):
        assert tree_snapshot(layers.mnt) == merged, "the kernel shows another tree"


def test_umount_clears_a_dead_mount(layers: Layers) -> None:
    with cleanup(layers.mnt):
        pid = mount_background(layers)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
        r = cli("umount", str(layers.mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
