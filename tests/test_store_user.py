"""The layer store as a normal user (``ovfuser`` through setpriv): FUSE for ``mount``,
kernel-userns for ``run``, ``user.overlay.*`` markers; and root working on that user's store."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mounts import mounts_under
from overlayfuse import LayerStore
from test_store_root import HOST_TOOLS
from unpriv import Unprivileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged runner needs root")


# type, mode, size and path; no size for dirs (it is the filesystem's own: on tmpfs it grows
# with the entries, and a run's root holds its mount points)
LIST = "\\( -type d -printf '%y %m - %p\\n' \\) -o -printf '%y %m %s %p\\n'"
FIND = f"find . {LIST} | sort"
# in a run the tree is /: its mount points (and what is mounted there) are not the tree's
FIND_IN_RUN = f"find . -xdev {LIST} | sort"


def as_user(u: Unprivileged, base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``store`` ARGS as the user; a ``run``'s command sees the host's programs."""
    if "run" in args:
        at = args.index("run") + 1
        args = (*args[:at], *HOST_TOOLS, *args[at:])
    return u.run([u.python, "-m", "overlayfuse", "store", "--base", str(base), *args],
                 capture_output=True, text=True, timeout=120)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_user_round_trip_and_root_on_the_users_store(unprivileged: Any) -> None:
    u: Unprivileged = unprivileged
    src = u.home / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/x").write_text("x")
    (src / "f").write_text("lower\n")
    for p in (src, src / "d", src / "d/x", src / "f"):
        os.lchown(p, u.uid, u.gid)
    base, mnt = u.home / "store", u.home / "mnt"
    mnt.mkdir()
    u.chown(mnt)
    ok(as_user(u, base, "init", "--from", str(src)))
    out = ok(as_user(u, base, "mount", "-v", str(mnt)))
    assert "backend fuse" in out
    try:
        assert [m.fstype for m in mounts_under(mnt)] == ["fuse.overlayfuse"]
        script = "echo new > f; rm d/x; mkdir e; echo e > e/y"
        # (root, even, cannot enter a user's FUSE mount: cd as the user)
        r = u.run(["sh", "-c", f"cd {mnt} && {script}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ok(as_user(u, base, "snapshot", "live"))   # through the daemon: it stays mounted
        r = u.run(["cat", f"{mnt}/f"], capture_output=True, text=True)
        assert r.stdout == "new\n", r.stderr
    finally:
        ok(as_user(u, base, "umount", str(mnt)))
    assert mounts_under(u.home) == []
    ok(as_user(u, base, "snapshot", "s"))
    out = ok(as_user(u, base, "run", "-v", "--", "sh", "-c", "cat f; ls d; id -u"))
    assert "backend kernel-userns" in out
    # root inside is the user outside (one ID mapped: the layers below show it)
    assert out.startswith("new\n0\n")     # f; nothing left in d; id -u; then -v's lines
    info = ok(as_user(u, base, "info"))
    assert "xattrs:    user.overlay.*" in info
    assert "mount:     backend fuse" in info and "run:       backend kernel-userns" in info
    ok(as_user(u, base, "run", "--writable", "--", "rm", "f"))
    assert "new" in ok(as_user(u, base, "run", "--", "cat", "f"))
    # the layers are the user's, in the user's namespace: whiteouts are 0/0 devices
    store = LayerStore(str(base))
    assert store.namespace == "user" and store.owner == (u.uid, u.gid)
    snap_layer = store.config("default").refs()["live"]  # where the changes were frozen
    layer_dir = base / "layers" / snap_layer
    wh = os.lstat(layer_dir / "d/x")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0 and wh.st_uid == u.uid
    for d, dirs, files in os.walk(base / "layers"):
        for name in dirs + files:
            assert os.lstat(os.path.join(d, name)).st_uid == u.uid, name
    # root on the user's store: the spec carries userxattr, so the kernel reads the same tree
    # as the user's FUSE mount and the user's namespace do
    config = store.config("default")
    root_mnt = u.home / "rootmnt"
    root_mnt.mkdir()
    with config.mount(str(root_mnt), "kernel", snapshot="s") as m:
        assert ("userxattr", None) in m.spec.options
        on_kernel = subprocess.run(FIND, shell=True, cwd=root_mnt, capture_output=True,
                                   text=True, check=True).stdout
    assert "./d/x" not in on_kernel and "./e/y" in on_kernel
    via_run = ok(as_user(u, base, "run", "--snapshot", "s", "--", "sh", "-c", FIND_IN_RUN))
    mount_points = {"proc", "dev", "sys", *(a.split(":")[0][1:] for a in HOST_TOOLS[1::2])}
    via_run = "".join(line + "\n" for line in via_run.splitlines()
                      if line.split()[-1][2:] not in mount_points)
    ok(as_user(u, base, "mount", "--snapshot", "s", str(mnt)))
    try:
        r = u.run(["sh", "-c", f"cd {mnt} && {FIND}"], capture_output=True, text=True)
    finally:
        ok(as_user(u, base, "umount", str(mnt)))
    assert on_kernel == via_run == r.stdout
    with config.mount(str(root_mnt)):                # root writes: the layer stays the user's
        (root_mnt / "by-root").write_text("r")
    assert os.lstat(base / "layers" / config.refs()[".upper"]).st_uid == u.uid
    config.clean()
    store.close()
    assert sorted(ok(as_user(u, base, "snapshots")).splitlines()) == ["  live", "  postinit",
                                                                     "* s"]
    ok(as_user(u, base, "scrub"))
    assert os.listdir(base / "layers") == []


def test_user_build_is_cached_and_its_layers_are_the_users(unprivileged: Any) -> None:
    u: Unprivileged = unprivileged
    base, steps = u.home / "store", u.home / "steps"
    steps.write_text("mkdir -p opt && echo built > opt/v\nid -u > opt/uid\n")
    u.chown(steps)
    build = [u.python, "-m", "overlayfuse", "build", "--base", str(base), *HOST_TOOLS,
             "--config", "app",
             "--tag", "v1", str(steps)]
    r = u.run(build, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "built app: 2 steps, 2 ran, 0 cached; key " in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith("; tagged v1"), r.stderr
    # the same again, moving v1 (to the same result): every step from the cache
    r = u.run([*build[:-1], "--force", build[-1]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "2 cached" in r.stderr, r.stderr
    out = ok(as_user(u, base, "--config", "app", "run", "--snapshot", "v1", "--",
                     "cat", "opt/v", "opt/uid"))
    assert out.startswith("built\n0\n")      # root inside; the files are the user's below
    for d, dirs, files in os.walk(base / "layers"):
        for name in dirs + files:
            assert os.lstat(os.path.join(d, name)).st_uid == u.uid, name
