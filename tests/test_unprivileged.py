"""A normal user mounts overlayfuse through fusermount3, changes the tree, and unmounts.

The upper a user writes must be the kernel's unprivileged format (its ``userxattr`` option):
``user.overlay.*`` xattrs, and char 0/0 whiteouts (mknod of 0/0 is allowed to users since 5.8).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from mounts import is_mounted, mounts_at
from unpriv import Unprivileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged runner needs root")

USER_SCRIPT = r"""
import json, os, sys
m = sys.argv[1]
j = lambda *p: os.path.join(m, *p)
res = {}
with open(j("f"), "ab") as f:
    f.write(b" appended")
with open(j("new"), "wb") as f:
    f.write(b"new")
os.unlink(j("d", "x"))
os.unlink(j("dd", "z"))
os.rmdir(j("dd"))
os.mkdir(j("dd"))
os.rename(j("d"), j("d2"))
os.symlink("f", j("link"))
os.mkfifo(j("fifo"))
os.chmod(j("mode"), 0o600)
os.setxattr(j("new"), "user.mine", b"1")
res["overlay xattr"] = None
try:
    os.setxattr(j("new"), "trusted.overlay.opaque", b"y")
except OSError as e:
    res["overlay xattr"] = e.errno
res["root"] = sorted(os.listdir(m))
res["d2"] = sorted(os.listdir(j("d2")))
res["dd"] = sorted(os.listdir(j("dd")))
res["f"] = open(j("f"), "rb").read().decode()
res["xattrs new"] = sorted(os.listxattr(j("new")))
res["xattrs dd"] = [x for x in os.listxattr(j("dd")) if "overlay" in x]
res["uid new"] = os.lstat(j("new")).st_uid == os.getuid()
print(json.dumps(res))
"""


def _give(u: Unprivileged, root: Path) -> None:
    """Hand a whole tree to the user (what it would own in real life)."""
    for d, dirs, files in os.walk(root):
        for n in [*dirs, *files]:
            os.lchown(os.path.join(d, n), u.uid, u.gid)


def test_user_mounts_changes_and_unmounts(unprivileged: Unprivileged) -> None:
    u = unprivileged
    ly = u.make_layers()
    low = ly.lowers[1]
    (low / "d").mkdir()
    (low / "d/x").write_bytes(b"x")
    (low / "d/y").write_bytes(b"y")
    (low / "dd").mkdir()
    (low / "dd/z").write_bytes(b"z")
    (low / "f").write_bytes(b"lower")
    (low / "mode").write_bytes(b"m")
    _give(u, low)
    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt) as dm:
        assert [m.fstype for m in mounts_at(ly.mnt)] == ["fuse.overlayfuse"]
        r = u.run_as_user([u.python, "-c", USER_SCRIPT, str(ly.mnt)], capture_output=True,
                          text=True)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        # root, even, is kept out of a user's mount (no allow_other)
        with pytest.raises(PermissionError):
            os.listdir(ly.mnt)
        um = u.run_as_user(["fusermount3", "-u", str(ly.mnt)], capture_output=True, text=True)
        assert um.returncode == 0, um.stderr
        assert not is_mounted(ly.mnt)
        assert dm.proc.wait(10) == 0
    assert res == {
        "overlay xattr": res["overlay xattr"],  # checked below
        "root": ["d2", "dd", "f", "fifo", "link", "mode", "new"],
        "d2": ["y"], "dd": [], "f": "lower appended", "xattrs new": ["user.mine"],
        "xattrs dd": [], "uid new": True,
    }
    # a user may not write trusted.* at all: EPERM, as the backing filesystem answers
    assert res["overlay xattr"] == 1
    up = ly.upper
    for p in ("f", "new", "dd", "d2", "link", "fifo", "mode"):
        assert os.lstat(up / p).st_uid == u.uid, p
    for p in ("d", "d2/x"):
        st = os.lstat(up / p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{p} is not a char 0/0 whiteout"
    assert os.getxattr(up / "dd", "user.overlay.opaque") == b"y"
    assert os.getxattr(up / "d2", "user.overlay.redirect") in (b"d", b"/d")
    for d, dirs, files in os.walk(up):
        for n in [".", *dirs, *files]:
            names = os.listxattr(os.path.join(d, n), follow_symlinks=False)
            assert not [x for x in names if x.startswith("trusted.")], (d, n, names)
    assert (low / "f").read_bytes() == b"lower"


def test_user_upper_reads_back_after_remount(unprivileged: Unprivileged) -> None:
    """What the user wrote (user.overlay.* markers) is read back by a second mount."""
    u = unprivileged
    ly = u.make_layers()
    low = ly.lowers[1]
    (low / "o").mkdir()
    (low / "o/hidden").write_bytes(b"h")
    (low / "r").mkdir()
    (low / "r/in").write_bytes(b"i")
    (low / "gone").write_bytes(b"g")
    _give(u, low)
    ops = ("import os, sys; m = sys.argv[1]; j = lambda p: os.path.join(m, p);"
           "os.unlink(j('o/hidden')); os.rmdir(j('o')); os.mkdir(j('o'));"
           "os.rename(j('r'), j('r2')); os.unlink(j('gone'))")
    show = ("import json, os, sys; m = sys.argv[1];"
            "print(json.dumps({d: sorted(os.listdir(os.path.join(m, d))) for d in ('', 'o', 'r2')}))")
    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt):
        r = u.run_as_user([u.python, "-c", ops, str(ly.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        first = u.run_as_user([u.python, "-c", show, str(ly.mnt)], capture_output=True,
                              text=True)
    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt):
        again = u.run_as_user([u.python, "-c", show, str(ly.mnt)], capture_output=True,
                              text=True)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert json.loads(first.stdout) == {"": ["o", "r2"], "o": [], "r2": ["in"]}
    assert again.stdout == first.stdout


def test_kernel_userxattr_reads_the_user_upper(unprivileged: Unprivileged, tmp_path: Path
                                               ) -> None:
    """The kernel, mounted with ``userxattr`` (what an unprivileged kernel mount uses), shows
    the same tree from the user's upper (no directory renames: the kernel does not follow
    redirects with userxattr)."""
    u = unprivileged
    ly = u.make_layers()
    low = ly.lowers[1]
    (low / "o").mkdir()
    (low / "o/hidden").write_bytes(b"h")
    (low / "gone").write_bytes(b"g")
    (low / "keep").write_bytes(b"k")
    _give(u, low)
    ops = ("import os, sys; m = sys.argv[1]; j = lambda p: os.path.join(m, p);"
           "os.unlink(j('o/hidden')); os.rmdir(j('o')); os.mkdir(j('o'));"
           "open(j('o/new'), 'w').write('n'); os.unlink(j('gone'));"
           "open(j('keep'), 'a').write('+')")
    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt):
        r = u.run_as_user([u.python, "-c", ops, str(ly.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    work2 = ly.root / "work2"
    work2.mkdir()
    opts = (f"lowerdir={ly.lowers[0]}:{ly.lowers[1]},upperdir={ly.upper},workdir={work2},"
            "userxattr")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(ly.mnt)], check=True)
    try:
        seen = {d: sorted(os.listdir(ly.mnt / d)) for d in ("", "o")}
        keep = (ly.mnt / "keep").read_bytes()
    finally:
        subprocess.run(["umount", str(ly.mnt)], check=True)
    assert seen == {"": ["keep", "o"], "o": ["new"]} and keep == b"k+"
