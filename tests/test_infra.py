"""Tests of the test harness itself: mounts come and go, snapshots see what a user sees, and the
unprivileged runner really is unprivileged. If these fail, no other result can be trusted."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from mounts import (Layers, MountError, diff_trees, fuse_overlayfs_mount, is_mounted,
                    kernel_overlay, mountinfo, mounts_at, overlayfuse_mount, tree_snapshot)
from unpriv import Unprivileged, fuse_device_mode

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _populate(layers: Layers) -> None:
    low, top = layers.lowers[-1], layers.lowers[0]
    (low / "d").mkdir()
    (low / "d" / "a").write_text("lower a\n")
    (low / "gone").write_text("to be deleted\n")
    (top / "d").mkdir()
    (top / "d" / "b").write_text("top b\n")
    os.symlink("/root", top / "link-to-root")
    os.setxattr(top / "d" / "b", "user.tag", b"v1")


def _edit(mnt: os.PathLike[str]) -> None:
    mnt = os.fspath(mnt)
    with open(os.path.join(mnt, "d", "a"), "a") as f:
        f.write("more\n")
    os.unlink(os.path.join(mnt, "gone"))
    os.mkdir(os.path.join(mnt, "new"))
    with open(os.path.join(mnt, "new", "f"), "w") as f:
        f.write("new\n")


@root_only
def test_kernel_overlay_mounts_and_leaves_nothing(layers: Layers) -> None:
    _populate(layers)
    lowers_before = [tree_snapshot(p) for p in layers.lowers]
    with kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt) as mnt:
        assert is_mounted(mnt)
        assert [m.fstype for m in mounts_at(mnt)] == ["overlay"]
        assert sorted(os.listdir(mnt)) == ["d", "gone", "link-to-root"]
        _edit(mnt)
        merged = tree_snapshot(mnt)
    assert not is_mounted(layers.mnt)
    assert not any(m.mountpoint.startswith(str(layers.root)) for m in mountinfo())
    assert [tree_snapshot(p) for p in layers.lowers] == lowers_before
    st = os.lstat(layers.upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)  # kernel whiteout
    assert merged["d/a"][0] == "f" and merged["d/b"][4] == (("user.tag", b"v1"),)
    assert "gone" not in merged and merged["new/f"][2] == 4


@root_only
def test_kernel_overlay_unmounts_when_the_body_raises(layers: Layers) -> None:
    (layers.lowers[0] / "x").write_text("x")
    with pytest.raises(RuntimeError, match="boom"):
        with kernel_overlay(layers.lowers, None, None, layers.mnt):  # read-only
            assert (layers.mnt / "x").read_text() == "x"
            raise RuntimeError("boom")
    assert not is_mounted(layers.mnt)


def test_tree_snapshot_never_follows_symlinks(tmp_path: os.PathLike[str]) -> None:
    base = tmp_path
    (base / "dir").mkdir()
    (base / "dir" / "f").write_bytes(b"abc")
    os.symlink("dir", base / "l")
    os.symlink("/nonexistent/x", base / "dangling")
    os.mkfifo(base / "fifo")
    snap = tree_snapshot(base)
    assert snap["l"][0] == "l" and snap["l"][3] == "dir"
    assert snap["dangling"][3] == "/nonexistent/x"
    assert "l/f" not in snap and snap["dir/f"][2] == 3
    assert snap["fifo"][0] == "p" and snap["."][0] == "d"
    os.chmod(base / "dir" / "f", 0o600)
    assert diff_trees(snap, tree_snapshot(base)) == [
        f"dir/f: {snap['dir/f']!r} != {tree_snapshot(base)['dir/f']!r}"]


@root_only
def test_fuse_overlayfs_matches_kernel(tmp_path: os.PathLike[str]) -> None:
    """The comparison harness agrees with itself: fuse-overlayfs and the kernel show one tree."""
    from mounts import make_layers
    k, f = make_layers(tmp_path / "k"), make_layers(tmp_path / "f")
    _populate(k)
    _populate(f)
    with kernel_overlay(k.lowers, k.upper, k.work, k.mnt) as mnt:
        _edit(mnt)
        want = tree_snapshot(mnt)
    with fuse_overlayfs_mount(f.lowers, f.upper, f.work, f.mnt) as dm:
        assert dm.alive() and [m.fstype for m in mounts_at(f.mnt)] == ["fuse.fuse-overlayfs"]
        _edit(f.mnt)
        got = tree_snapshot(f.mnt)
    assert not is_mounted(f.mnt) and not dm.alive()
    # directory mtimes/sizes are not in the snapshot; everything user-visible must agree
    assert diff_trees(want, got) == []


@root_only
def test_overlayfuse_mount_failure_shows_daemon_stderr(layers: Layers) -> None:
    missing = layers.root / "no-such-lower"
    with pytest.raises(MountError, match="overlayfuse: ") as exc:
        with overlayfuse_mount([missing], layers.upper, layers.work, layers.mnt):
            pass
    assert "Traceback" not in str(exc.value)
    assert not is_mounted(layers.mnt)


@root_only
def test_overlayfuse_mounts_and_unmounts(layers: Layers) -> None:
    _populate(layers)
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt) as dm:
        assert [m.fstype for m in mounts_at(layers.mnt)] == ["fuse.overlayfuse"]
        assert sorted(os.listdir(layers.mnt)) == ["d", "gone", "link-to-root"]
        (layers.mnt / "hello").write_text("hi")
    assert not is_mounted(layers.mnt) and not dm.alive()
    assert (layers.upper / "hello").read_text() == "hi"


@root_only
def test_fuse_device_mode_is_restored_on_error() -> None:
    before = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    with pytest.raises(KeyError):
        with fuse_device_mode(0o666):
            assert stat.S_IMODE(os.stat("/dev/fuse").st_mode) == 0o666
            raise KeyError("x")
    assert stat.S_IMODE(os.stat("/dev/fuse").st_mode) == before


def test_unprivileged_runner_is_another_uid(unprivileged: Unprivileged) -> None:
    u = unprivileged
    assert u.uid != 0
    r = u.run_as_user(["id", "-u"], capture_output=True, text=True, check=True)
    assert int(r.stdout) == u.uid
    r = u.run_as_user(["id", "-G"], capture_output=True, text=True, check=True)
    assert r.stdout.split() == [str(u.gid)]
    r = u.run_as_user(["ls", "/root"], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = u.python_run("import os, pyfuse3, trio, overlayfuse; "
                     "print(os.getuid(), os.path.dirname(overlayfuse.__file__))")
    assert r.returncode == 0, r.stderr
    uid, where = r.stdout.split()
    assert int(uid) == u.uid and where.startswith(str(u.pythonpath))
    assert stat.S_IMODE(os.stat("/dev/fuse").st_mode) == 0o666
    p = u.popen_as_user(["sh", "-c", "touch mine; id -u"], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and int(out) == u.uid
    assert os.stat(u.home / "mine").st_uid == u.uid


def test_unprivileged_fuse_overlayfs_mount(unprivileged: Unprivileged) -> None:
    """fuse-overlayfs as the user shows the runner can mount and unmount through fusermount3."""
    u = unprivileged
    ly = u.make_layers()
    (ly.lowers[1] / "f").write_text("lower")
    u.chown(ly.lowers[1] / "f")
    with u.fuse_overlayfs_mount(ly.lowers, ly.upper, ly.work, ly.mnt) as dm:
        r = u.run_as_user(["sh", "-c", f"echo up >> {ly.mnt}/f && cat {ly.mnt}/f"],
                          capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "lowerup\n", r.stderr
    assert not is_mounted(ly.mnt) and not dm.alive()
    assert os.stat(ly.upper / "f").st_uid == u.uid
    assert (ly.lowers[1] / "f").read_text() == "lower"


def test_unprivileged_overlayfuse_mount(unprivileged: Unprivileged) -> None:
    u = unprivileged
    ly = u.make_layers()
    (ly.lowers[0] / "f").write_text("lower")
    u.chown(ly.lowers[0] / "f")
    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt) as dm:
        assert [m.fstype for m in mounts_at(ly.mnt)] == ["fuse.overlayfuse"]
        r = u.run_as_user(["sh", "-c", f"echo up >> {ly.mnt}/f && rm {ly.mnt}/f && ls -A {ly.mnt}"],
                          capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "", r.stderr
    assert not is_mounted(ly.mnt) and not dm.alive()
    st = os.lstat(ly.upper / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_uid == u.uid
