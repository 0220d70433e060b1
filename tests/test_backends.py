"""Backends and the automatic choice: real kernel refusals, real fallbacks, one merged tree.

The fallbacks are forced by the kernel itself, never by a mock: an unprivileged user (mount(2)
refused), a user whose process cannot create user namespaces (a seccomp filter installed by root
before dropping privileges: unshare(CLONE_NEWUSER) fails with EPERM while setuid fusermount3
keeps working), and an upper dir inside a kernel overlay (refused as upperdir).
"""
from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import overlayfuse
from helpers import ovf
from mounts import is_mounted, make_layers, mounts_under, tree_snapshot
from overlayfuse import sysmount
from overlayfuse.backends import choose, get_backend
from overlayfuse.errors import OverlayfuseError
from overlayfuse.spec import OverlaySpec

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

TESTS = Path(__file__).resolve().parent


def fill(layers_root: Path, lowers: list[Path]) -> None:
    """Content that exercises the lookup rules: shadowing, whiteouts, opaque dirs, links."""
    top, bottom = lowers[0], lowers[1]
    (bottom / "shadowed").write_text("bottom")
    (top / "shadowed").write_text("top")
    (bottom / "deleted").write_text("x")
    os.mknod(top / "deleted", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # whiteout
    (bottom / "dir").mkdir()
    (bottom / "dir" / "old").write_text("old")
    (top / "dir").mkdir()
    (top / "dir" / "new").write_text("new")
    (bottom / "opaque").mkdir()
    (bottom / "opaque" / "hidden").write_text("hidden")
    (top / "opaque").mkdir()
    (top / "opaque" / "shown").write_text("shown")
    for ns in ("trusted", "user"):  # both namespaces: every backend reads its own
        os.setxattr(top / "opaque", f"{ns}.overlay.opaque", b"y")
    os.symlink("shadowed", top / "link")
    (bottom / "exec").write_text("#!/bin/sh\n")
    os.chmod(bottom / "exec", 0o755)


def normal(snap: dict) -> dict:
    return json.loads(json.dumps(snap))


DUMP = ("import json, sys; sys.path.insert(0, {tests!r}); from mounts import tree_snapshot; "
        "print(json.dumps(tree_snapshot('.')))")


# -- kernel backend ---------------------------------------------------------------------------

def test_kernel_mounts_500_lowers(tmp_path: Path) -> None:
    """Far beyond mount(2)'s one page of options: the new mount API, one lowerdir+ each."""
    base = tmp_path / ("long-directory-name-" * 4)
    lowers = []
    for i in range(500):
        d = base / f"layer-{i:04d}"
        d.mkdir(parents=True)
        (d / f"f{i}").write_text(str(i))
        (d / "same").write_text(str(i))
        lowers.append(str(d))
    assert len(":".join(lowers)) > 4096 * 10
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with overlayfuse.mount(OverlaySpec(tuple(lowers)), str(mnt), backend="kernel") as m:
        assert m.backend == "kernel"
        assert len(os.listdir(mnt)) == 501
        assert (mnt / "same").read_text() == "0"   # topmost wins
        assert (mnt / "f499").read_text() == "499"
    assert not is_mounted(mnt)


def test_kernel_legacy_mount2_with_relative_paths(tmp_path: Path) -> None:
    """The mount(2) path for kernels without lowerdir+: cwd tricks keep 500 lowers in a page."""
    lowers = []
    for i in range(500):
        d = tmp_path / "layers" / f"very-long-layer-directory-{i:04d}"
        d.mkdir(parents=True)
        (d / f"f{i}").write_text(str(i))
        lowers.append(str(d))
    for d in ("u", "w", "m"):
        (tmp_path / d).mkdir()
    pairs = sysmount.overlay_option_pairs(lowers, str(tmp_path / "u"), str(tmp_path / "w"))
    assert len(sysmount.legacy_data(lowers, pairs)) > sysmount.PAGE_LIMIT
    sysmount._mount_relative(lowers, pairs, str(tmp_path / "m"))
    try:
        assert len(os.listdir(tmp_path / "m")) == 500
        (tmp_path / "m" / "written").write_text("w")
        assert (tmp_path / "u" / "written").read_text() == "w"
    finally:
        sysmount.umount2(str(tmp_path / "m"))


def test_kernel_layer_path_longer_than_fsconfig_limit(tmp_path: Path) -> None:
    deep = tmp_path
    while len(str(deep)) < 300:
        deep = deep / ("d" * 60)
    lower = deep / "lower"
    lower.mkdir(parents=True)
    (lower / "f").write_text("deep")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with overlayfuse.mount(OverlaySpec((str(lower),)), str(mnt), backend="kernel"):
        assert (mnt / "f").read_text() == "deep"


def test_kernel_userns_never_serves_mount(tmp_path: Path) -> None:
    ly = make_layers(tmp_path)
    spec = OverlaySpec(tuple(map(str, ly.lowers)), str(ly.upper), str(ly.work))
    with pytest.raises(OverlayfuseError, match="only `run`"):
        overlayfuse.mount(spec, str(ly.mnt), backend="kernel-userns")
    with pytest.raises(OverlayfuseError, match="unknown backend"):
        get_backend("nfs")


def test_auto_as_root_chooses_kernel(tmp_path: Path) -> None:
    ly = make_layers(tmp_path)
    spec = OverlaySpec(tuple(map(str, ly.lowers)), str(ly.upper), str(ly.work))
    chosen, why = choose(spec, "mount")
    assert chosen.name == "kernel" and "mount(2) of overlayfs works" in why
    assert choose(spec, "run")[0].name == "kernel"


# -- the same merged tree through every backend -----------------------------------------------

def test_same_layers_same_tree_through_every_backend(tmp_path: Path) -> None:
    ly = make_layers(tmp_path)
    fill(ly.root, ly.lowers)
    spec = OverlaySpec(tuple(map(str, ly.lowers)))
    trees: dict[str, dict] = {}
    for backend in ("kernel", "fuse"):
        with overlayfuse.mount(spec, str(ly.mnt), backend=backend) as m:
            assert m.backend == backend
            trees[f"mount/{backend}"] = normal(tree_snapshot(ly.mnt))
        assert not is_mounted(ly.mnt)
    for backend in ("kernel", "kernel-userns", "fuse"):
        r = ovf("run", "--backend", backend, "-o", "lowerdir=" + ":".join(map(str, ly.lowers)),
                "--", sys.executable, "-c", DUMP.format(tests=str(TESTS)))
        assert r.returncode == 0, r.stderr
        trees[f"run/{backend}"] = json.loads(r.stdout)
    reference = trees["mount/kernel"]
    assert "opaque/hidden" not in reference and "deleted" not in reference
    assert "dir/old" in reference and "opaque/shown" in reference
    for name, tree in trees.items():
        assert tree == reference, name
    assert mounts_under(tmp_path) == []


# -- real refusals and fallbacks --------------------------------------------------------------

@pytest.fixture
def overlay_dir(tmp_path: Path):
    """A directory inside a kernel overlay: overlayfs refuses it as an upper dir."""
    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    m = tmp_path / "m"
    sysmount.mount_overlay([str(tmp_path / "l")], str(tmp_path / "u"), str(tmp_path / "w"),
                           str(m))
    try:
        yield m
    finally:
        for mp in sysmount.mounts_under(str(m)):
            sysmount.umount2(mp, sysmount.MNT_DETACH)


def test_upper_on_overlay_kernel_refuses_with_reason(overlay_dir: Path) -> None:
    ly = make_layers(overlay_dir / "layers")
    (ly.lowers[1] / "f").write_text("lower")
    opts = (f"lowerdir={ly.lowers[0]}:{ly.lowers[1]},upperdir={ly.upper},workdir={ly.work}")
    r = ovf("check", "--upper", str(overlay_dir))
    assert "kernel         NOT supported" in r.stdout
    assert "not supported as upperdir" in r.stdout
    assert "filesystem: overlay" in r.stdout
    r = ovf("mount", "--backend", "kernel", "-o", opts, str(ly.mnt))
    assert r.returncode != 0
    assert r.stderr.startswith("overlayfuse: backend kernel cannot mount here")
    assert "not supported as upperdir" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not is_mounted(ly.mnt)


def test_upper_on_overlay_auto_falls_back_to_fuse(overlay_dir: Path) -> None:
    ly = make_layers(overlay_dir / "layers")
    (ly.lowers[1] / "f").write_text("lower")
    opts = (f"lowerdir={ly.lowers[0]}:{ly.lowers[1]},upperdir={ly.upper},workdir={ly.work}")
    r = ovf("mount", "-v", "-o", opts, str(ly.mnt))
    try:
        assert r.returncode == 0, r.stderr
        assert "backend fuse" in r.stderr and "not supported as upperdir" in r.stderr
        assert (ly.mnt / "f").read_text() == "lower"
        (ly.mnt / "f").write_text("changed")
        assert (ly.upper / "f").read_text() == "changed"
        os.unlink(ly.mnt / "f")
        assert not (ly.mnt / "f").exists()
    finally:
        ovf("umount", str(ly.mnt))
    assert not is_mounted(ly.mnt)


# -- unprivileged users -----------------------------------------------------------------------

SECCOMP_LAUNCHER = r"""
import ctypes, os, struct, sys
uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
prog = b"".join([
    ins(LD, 0, 0, 4), ins(JEQ, 0, 8, 0xC000003E),        # x86_64 only, else allow
    ins(LD, 0, 0, 0),
    ins(JEQ, 3, 0, 272), ins(JEQ, 2, 0, 56),             # unshare, clone: check flags
    ins(JEQ, 0, 4, 435), ins(RET, 0, 0, ERRNO | 38),     # clone3: ENOSYS (libc falls back)
    ins(LD, 0, 0, 16), ins(JSET, 0, 1, 0x10000000),      # flags & CLONE_NEWUSER
    ins(RET, 0, 0, ERRNO | 1), ins(RET, 0, 0, ALLOW)])   # EPERM / allow
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(prog, len(prog))
fp = Fprog(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
# root may install a filter without no_new_privs, which would disable setuid fusermount3
if libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.execvpe(argv[0], argv, os.environ)
"""


def as_user(u: Any, args: list[str], seccomp: bool = False, **kw: Any
            ) -> subprocess.CompletedProcess[str]:
    """``python -m overlayfuse ARGS`` as the unprivileged user, optionally without userns."""
    argv = [u.python, "-m", "overlayfuse", *args]
    if seccomp:
        if platform.machine() != "x86_64":
            pytest.skip("the seccomp filter is written for x86_64")
        argv = [sys.executable, "-c", SECCOMP_LAUNCHER, str(u.uid), str(u.gid), *argv]
        kw["env"] = u.env(kw.pop("env", None))
        kw.setdefault("cwd", str(u.home))
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)
    return u.run(argv, capture_output=True, text=True, timeout=120, **kw)


def test_unprivileged_check(unprivileged: Any) -> None:
    r = as_user(unprivileged, ["check", "--upper", str(unprivileged.home)])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "kernel         NOT supported: mounting needs root" in out
    assert "kernel-userns  supported for run only" in out
    assert "fuse           supported" in out
    assert "trusted.* xattrs:        no" in out and "user.* xattrs:           yes" in out
    assert "auto chooses: mount -> fuse, run -> kernel-userns" in out
    r = as_user(unprivileged, ["check", "--upper", str(unprivileged.home), "--json"])
    d = json.loads(r.stdout)
    assert d["choice"] == {"mount": "fuse", "run": "kernel-userns"}
    assert d["uid"] == unprivileged.uid and d["cached"] is True  # the text run cached it
    assert not d["backends"]["kernel"]["mount"]["ok"]


def test_unprivileged_mount_auto_is_fuse_and_kernel_refuses(unprivileged: Any) -> None:
    u = unprivileged
    ly = u.make_layers()
    (ly.lowers[1] / "f").write_text("lower")
    opts = f"lowerdir={ly.lowers[0]}:{ly.lowers[1]},upperdir={ly.upper},workdir={ly.work}"
    r = as_user(u, ["mount", "--backend", "kernel", "-o", opts, str(ly.mnt)])
    assert r.returncode != 0 and not is_mounted(ly.mnt)
    assert r.stderr.strip() == ("overlayfuse: backend kernel cannot mount here: mounting "
                                "needs root (CAP_SYS_ADMIN); you are ovfuser")
    r = as_user(u, ["mount", "-v", "-o", opts, str(ly.mnt)])
    try:
        assert r.returncode == 0, r.stderr
        assert "backend fuse" in r.stderr and "mounting needs root" in r.stderr
        assert any(m.fstype == "fuse.overlayfuse" for m in mounts_under(ly.mnt))
        # another process of the user sees the mount (what an IDE needs)
        w = u.run(["sh", "-c", f"cat {ly.mnt}/f && echo new > {ly.mnt}/g"],
                  capture_output=True, text=True)
        assert w.stdout == "lower", w.stderr
        assert (ly.upper / "g").read_text() == "new\n"
    finally:
        as_user(u, ["umount", str(ly.mnt)])
    assert not is_mounted(ly.mnt)


def test_without_user_namespaces_run_falls_back_to_fuse(unprivileged: Any) -> None:
    u = unprivileged
    ly = u.make_layers()
    (ly.lowers[1] / "f").write_text("lower")
    u.chown(ly.lowers[1] / "f")
    r = as_user(u, ["check", "--upper", str(u.home)], seccomp=True)
    assert r.returncode == 0, r.stderr
    assert ("kernel-userns  NOT supported: cannot create a user namespace: "
            "unshare(CLONE_NEWUSER) failed: Operation not permitted") in r.stdout
    assert "auto chooses: mount -> fuse, run -> fuse" in r.stdout
    lower_opt = f"lowerdir={ly.lowers[0]}:{ly.lowers[1]}"
    r = as_user(u, ["run", "--backend", "kernel-userns", "-o", lower_opt, "--", "true"],
                seccomp=True)
    assert r.returncode == 125
    assert r.stderr.strip().startswith("overlayfuse: backend kernel-userns cannot run here: "
                                       "cannot create a user namespace")
    r = as_user(u, ["run", "-v", "--writable", "-o", lower_opt, "--",
                    "sh", "-c", "cat f; echo x > f; cat f; exit 4"], seccomp=True)
    assert r.returncode == 4, r.stderr
    assert r.stdout == "lowerx\n", r.stderr
    assert "backend fuse" in r.stderr and "Operation not permitted" in r.stderr
    assert (ly.lowers[1] / "f").read_text() == "lower"
    assert mounts_under(u.home) == []


def test_api_fuse_mount_as_root_is_every_users(open_tmp: Path) -> None:
    """overlayfuse.mount(..., backend="fuse") as root mounts as `overlayfuse mount` does:
    allow_other (every user sees it, as a kernel overlay), dev and suid."""
    from mounts import mounts_at
    ly = make_layers(open_tmp / "api", 1)
    (ly.lowers[0] / "f").write_text("for everyone")
    os.chmod(ly.lowers[0] / "f", 0o644)
    for d in (open_tmp / "api", ly.mnt):
        os.chmod(d, 0o755)
    spec = OverlaySpec(lowerdirs=(str(ly.lowers[0]),), upperdir=str(ly.upper),
                       workdir=str(ly.work))
    with overlayfuse.mount(spec, str(ly.mnt), backend="fuse"):
        options = mounts_at(ly.mnt)[-1].options
        assert "allow_other" in options and "nodev" not in options and "nosuid" not in options
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "cat", str(ly.mnt / "f")], capture_output=True, text=True)
        assert (r.returncode, r.stdout) == (0, "for everyone"), r.stderr
