"""``xattr_permissions=1|2`` through fuse-overlayfs and overlayfuse: same owners, modes, errnos.

Identical layers (a plain lower, and one laid out as containers/storage does, with
``user.containers.override_stat`` on its root and entries), one script of stat/chmod/chown/
create/mkdir/xattr steps run by root and by another user, compared step by step.  Then the
layers each one wrote are mounted by the other: what one stored, the other must show.

Debian's fuse-overlayfs is 1.10, which has bugs that later releases fixed (NEWS of 1.14:
"honor umask with xattr_permissions", "fix file owner retrieval for chmod", "do not force -1
for owner overriding extended attributes", "honor mode for devices").  overlayfuse does what
the fixed releases do; the script keeps those cases out of the step-by-step comparison and
``KNOWN`` checks each one on its own, with both sides' values, so the difference is pinned.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from mounts import PRIVATE_XATTR_PREFIXES, fuse_overlayfs_mount, make_layers, mounts_under, \
    overlayfuse_mount, tree_snapshot
from test_idmap_differential import as_ids

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="setresuid and root mounts need root"),
    pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="needs fuse-overlayfs"),
]

NAME = {1: "security.fuseoverlayfs.override_stat", 2: "user.fuseoverlayfs.override_stat"}
CONTAINERS = "user.containers.override_stat"
ROOT = (0, 0)
USER = (1000, 1000)
# fuse-overlayfs 1.10 shows security.fuseoverlayfs.* (=1) to listxattr; overlayfuse hides it
HIDE = (*PRIVATE_XATTR_PREFIXES, "security.fuseoverlayfs.")
MOUNTS = {"fuse-overlayfs": fuse_overlayfs_mount, "overlayfuse": overlayfuse_mount}


def shown(path: Path) -> tuple[int, int, str]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))


def touch(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def listed(path: Path) -> list[str]:
    """listxattr but the names 1.10 shows and overlayfuse hides (see ``KNOWN``)."""
    return sorted(n for n in os.listxattr(path) if not n.startswith((HIDE[-1], CONTAINERS)))


def opened(path: Path, flags: int) -> None:
    os.close(os.open(path, flags))


def build_lower(lower: Path, containers: bool) -> None:
    for name, ids, mode in (("root", 0, 0o644), ("one", 1, 0o640), ("far", 70000, 0o600)):
        (lower / name).write_text(name)
        os.chown(lower / name, ids, ids)
        os.chmod(lower / name, mode)
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old")
    os.chown(lower / "dir" / "old", 2, 2)
    os.symlink("root", lower / "sym")
    os.mkfifo(lower / "fifo")
    (lower / "pub").mkdir()
    os.chmod(lower / "pub", 0o777)  # where the user writes: 0777 on disk and in the xattr
    if containers:  # the owners a rootless engine could not give: in the xattr of each
        os.setxattr(lower, CONTAINERS, b"0:0:755")
        os.setxattr(lower / "root", CONTAINERS, b"0:0:644")
        os.setxattr(lower / "one", CONTAINERS, b"1000:1000:640")
        os.setxattr(lower / "dir", CONTAINERS, b"1000:1000:770")
        os.setxattr(lower / "pub", CONTAINERS, b"0:0:777")
        os.setxattr(lower / "dir" / "old", CONTAINERS, b"3:4:600")
        os.setxattr(lower / "far", CONTAINERS, b"0:0:4755:file")  # 1.15's form, type last


def script(m: Path, containers: bool) -> list[tuple[str, Any]]:
    """Steps with their outcomes.  chmod only of entries root owns (1.10 resets the owner of
    what it chmods to 0:0), and no partial chown (1.10 stores -1): see ``KNOWN``."""
    steps: list[tuple[str, Any]] = []

    def step(what: str, ids: tuple[int, int], fn: Callable[..., Any], *args: Any) -> None:
        steps.append((what, as_ids(ids, fn, *args)))

    for name in ("", "root", "one", "far", "dir", "dir/old", "sym", "fifo", "pub"):
        step(f"stat {name or '.'}", ROOT, shown, m / name)
    step("chmod root 0600", ROOT, os.chmod, m / "root", 0o600)
    step("stat root after chmod", ROOT, shown, m / "root")
    step("chown one 5:6", ROOT, os.chown, m / "one", 5, 6)
    step("chown dir/old 7:8", ROOT, os.chown, m / "dir" / "old", 7, 8)
    step("root mkdir newdir", ROOT, os.mkdir, m / "newdir")  # 0755: the same in 1.10
    step("stat newdir", ROOT, shown, m / "newdir")
    step("root creates rootnew", ROOT, touch, m / "rootnew")
    step("user creates pub/x", USER, touch, m / "pub" / "x")
    step("user mkdir pub/y", USER, os.mkdir, m / "pub" / "y", 0o755)
    step("stat pub/y", ROOT, shown, m / "pub" / "y")
    step("user chowns pub/x to 5", USER, os.chown, m / "pub" / "x", 5, -1)
    step("user chowns one (not its own)", USER, os.chown, m / "one", 1000, 1000)
    step("user chmods root (not its own)", USER, os.chmod, m / "root", 0o777)
    step("user reads root (0600, root's)", USER, opened, m / "root", os.O_RDONLY)
    step("user writes one (5:6 0640)", USER, opened, m / "one", os.O_WRONLY)
    step("user sets the override xattr", USER, os.setxattr, m / "pub" / "x",
         "user.fuseoverlayfs.override_stat", b"0:0:4755")
    step("root sets the override xattr", ROOT, os.setxattr, m / "root",
         "user.fuseoverlayfs.override_stat", b"0:0:4755")
    step("getxattr of the override", ROOT, os.getxattr, m / "one",
         "user.fuseoverlayfs.override_stat")
    step("listxattr one", ROOT, listed, m / "one")
    step("user.k on one", ROOT, os.setxattr, m / "one", "user.k", b"v")
    step("read back user.k", ROOT, os.getxattr, m / "one", "user.k")
    for name in ("one", "dir/old", "pub/x", "newdir", "sym", "fifo"):
        step(f"owner of {name} after", ROOT, lambda p: shown(p)[:2], m / name)
    return steps


def known(m: Path) -> dict[str, Any]:
    """The cases where 1.10 is wrong (fixed in 1.14/1.15): their outcomes, kept apart."""
    out: dict[str, Any] = {}

    def case(what: str, ids: tuple[int, int], fn: Callable[..., Any], *args: Any) -> None:
        out[what] = as_ids(ids, fn, *args)

    case("mode of rootnew (umask 022)", ROOT, shown, m / "rootnew")
    case("mode of pub/x (umask 022)", ROOT, shown, m / "pub" / "x")
    case("chgrp newdir to 9", ROOT, os.chown, m / "newdir", -1, 9)
    case("newdir after chgrp", ROOT, shown, m / "newdir")
    case("user chmods pub/x 0600", USER, os.chmod, m / "pub" / "x", 0o600)
    case("pub/x after chmod", ROOT, shown, m / "pub" / "x")
    case("root mkfifo fifo2", ROOT, os.mkfifo, m / "fifo2", 0o600)
    case("fifo2", ROOT, shown, m / "fifo2")
    case("lchown sym 5:5", ROOT, os.lchown, m / "sym", 5, 5)
    case("sym after lchown", ROOT, shown, m / "sym")
    case("root creates dir/k", ROOT, touch, m / "dir" / "k")  # dir/ is copied up
    case("dir after its copy-up", ROOT, shown, m / "dir")
    case("listxattr one", ROOT, lambda p: sorted(os.listxattr(p)), m / "one")
    return out


def expected_known(level: int, containers: bool) -> dict[str, tuple[Any, Any]]:
    """(overlayfuse's, 1.10's) outcome of each ``known`` case; overlayfuse's is the fixed
    releases' answer (or, for symlinks and fifos, the real chown/mode: they carry no
    override, so 1.10 and 1.16 alike lose a chown or store a mode that is never read)."""
    dir_shown = "(1000, 1000, '0o770')" if containers else "(0, 0, '0o755')"
    special_ok = "'ok'" if level == 2 else "'ENOTSUP'"  # 1.10: no security.* on a fifo/link
    return {
        "mode of rootnew (umask 022)": ("(0, 0, '0o644')", "(0, 0, '0o755')"),
        "mode of pub/x (umask 022)": ("(1000, 1000, '0o644')", "(1000, 1000, '0o755')"),
        "chgrp newdir to 9": ("'ok'", "'ok'"),
        # 1.10 stores the -1 of "owner unchanged", shown as the overflow ID
        "newdir after chgrp": ("(0, 9, '0o755')", "(65534, 9, '0o755')"),
        "user chmods pub/x 0600": ("'ok'", "'ok'"),
        "pub/x after chmod": ("(1000, 1000, '0o600')", "(0, 0, '0o600')"),
        "root mkfifo fifo2": ("'ok'", special_ok),
        "fifo2": ("(0, 0, '0o600')", "(0, 0, '0o755')" if level == 2 else "'ENOENT'"),
        "lchown sym 5:5": ("'ok'", special_ok),
        "sym after lchown": ("(5, 5, '0o777')", "(0, 0, '0o777')"),
        "root creates dir/k": ("'ok'", "'ok'"),
        # 1.10's copy-up of a dir keeps the backing dir's owner and mode, not the shown ones
        "dir after its copy-up": (dir_shown, "(0, 0, '0o755')"),
        # 1.10 shows =1's security.* name, and copies the lower's user.containers.* xattr up
        # and shows it
        "listxattr one": ("['user.k']", repr(sorted(
            ["user.k"] + (["user.containers.override_stat"] if containers else [])
            + (["security.fuseoverlayfs.override_stat"] if level == 1 else [])))),
    }


def _tree(m: Path) -> dict[str, tuple[Any, ...]]:
    return tree_snapshot(m, owner=True, hide_xattrs=(*HIDE, CONTAINERS))  # 1.10 shows it


@pytest.mark.parametrize("containers", [False, True], ids=["plain", "containers-layer"])
@pytest.mark.parametrize("level", [1, 2])
def test_xattr_permissions_matches_fuse_overlayfs(open_tmp: Path, level: int,
                                                  containers: bool) -> None:
    opts = (f"xattr_permissions={level}",)
    results, knowns, trees, layers = {}, {}, {}, {}
    old = os.umask(0o022)
    try:
        for name, mount in MOUNTS.items():
            lay = layers[name] = make_layers(open_tmp / name, n_lowers=1)
            build_lower(lay.lowers[0], containers)
            with mount(lay.lowers, lay.upper, lay.work, lay.mnt, extra=opts):
                results[name] = script(lay.mnt, containers)
                knowns[name] = known(lay.mnt)
                trees[name] = _tree(lay.mnt)
    finally:
        os.umask(old)
    ours, theirs = results["overlayfuse"], results["fuse-overlayfs"]
    assert [s[0] for s in ours] == [s[0] for s in theirs]
    differing = [(what, a, b) for (what, a), (_, b) in zip(ours, theirs) if a != b]
    assert not differing, differing
    got = dict(ours)
    # what the steps say, so that agreeing on something wrong cannot pass
    assert got["stat root after chmod"] == "(0, 0, '0o600')"
    assert got["owner of one after"] == "(5, 6)" and got["owner of dir/old after"] == "(7, 8)"
    assert got["owner of pub/x after"] == "(1000, 1000)"  # the caller's, root's on disk
    assert got["user chowns pub/x to 5"] == got["user chowns one (not its own)"] == "'EPERM'"
    assert got["user chmods root (not its own)"] == "'EPERM'"
    assert got["user reads root (0600, root's)"] == "'EACCES'"
    assert got["user writes one (5:6 0640)"] == "'EACCES'"
    assert got["user sets the override xattr"] == got["root sets the override xattr"] == "'EPERM'"
    assert got["getxattr of the override"] == "'ENODATA'"
    assert got["read back user.k"] == "b'v'"
    if containers:
        assert got["stat one"] == "(1000, 1000, '0o640')"
        assert got["stat dir"] == "(1000, 1000, '0o770')"
        assert got["stat dir/old"] == "(3, 4, '0o600')"
        assert got["stat far"] == "(0, 0, '0o4755')"
    else:
        assert got["stat one"] == "(1, 1, '0o640')" and got["stat far"] == "(70000, 70000, '0o600')"
    assert got["stat sym"] == "(0, 0, '0o777')" and got["stat fifo"] == "(0, 0, '0o644')"
    expected = expected_known(level, containers)
    assert {k: v[0] for k, v in expected.items()} == knowns["overlayfuse"]
    assert {k: v[1] for k, v in expected.items()} == knowns["fuse-overlayfs"]
    # on disk: root's files, mode | 0755, the owner and mode in the option's xattr
    upper = layers["overlayfuse"].upper
    st = os.lstat(upper / "one")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode) & 0o755) == (0, 0, 0o755)
    assert os.getxattr(upper / "one", NAME[level]) == b"5:6:640"
    assert os.getxattr(upper / "pub" / "x", NAME[level]) == b"1000:1000:600"
    assert CONTAINERS not in os.listxattr(upper / "one")  # the lower's name is not copied
    # each one's layers through the other: the same tree as the writer showed
    for writer, reader in (("overlayfuse", "fuse-overlayfs"), ("fuse-overlayfs", "overlayfuse")):
        lay = layers[writer]
        with MOUNTS[reader](lay.lowers, lay.upper, lay.work, lay.mnt, extra=opts):
            again = _tree(lay.mnt)
        assert again == trees[writer], (writer, reader)


USER_SCRIPT = r"""
import errno, json, os, stat, sys
m = sys.argv[1]
def outcome(fn, *a):
    try:
        r = fn(*a)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok" if r is None else r
def shown(p):
    st = os.lstat(p)
    return [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]
out = {}
for name in ("", "mine", "theirs", "dir", "dir/in"):
    out["stat " + name] = outcome(shown, m + "/" + name)
out["create n"] = outcome(lambda: os.close(os.open(m + "/n", os.O_CREAT | os.O_WRONLY, 0o755)))
out["owner n"] = outcome(lambda: shown(m + "/n")[:2])
out["write theirs (0:0 0644)"] = outcome(lambda: os.close(os.open(m + "/theirs", os.O_WRONLY)))
out["list dir (0:0 0700)"] = outcome(os.listdir, m + "/dir")
out["chown mine 0:0"] = outcome(os.chown, m + "/mine", 0, 0)
out["write mine"] = outcome(lambda: os.close(os.open(m + "/mine", os.O_WRONLY)))
out["getxattr override"] = outcome(os.getxattr, m + "/mine", "user.fuseoverlayfs.override_stat")
out["setxattr override"] = outcome(os.setxattr, m + "/mine",
                                   "user.fuseoverlayfs.override_stat", b"0:0:4755")
out["chmod mine 0640"] = outcome(os.chmod, m + "/mine", 0o640)
out["stat mine after"] = outcome(shown, m + "/mine")
print(json.dumps(out))
"""


def test_unprivileged_xattr_permissions_2_matches_fuse_overlayfs(unprivileged) -> None:  # noqa: ANN001
    """=2's real use: a normal user's mount (fusermount3, default_permissions) of layers whose
    owners are only in ``user.containers.override_stat``: the kernel checks access against
    them; copy-up keeps them; what the user creates is the user's.  As fuse-overlayfs."""
    u = unprivileged
    results, uppers = {}, {}
    for name in ("fuse-overlayfs", "overlayfuse"):
        lay = u.make_layers(n_lowers=1, name=name)
        low = lay.lowers[0]
        for f in ("mine", "theirs"):
            (low / f).write_text(f)
        (low / "dir").mkdir()
        (low / "dir" / "in").write_text("in")
        u.chown(low / "mine", low / "theirs", low / "dir", low / "dir" / "in")
        os.setxattr(low, CONTAINERS, b"0:0:755")
        os.setxattr(low / "mine", CONTAINERS, b"%d:%d:644" % (u.uid, u.gid))
        os.setxattr(low / "theirs", CONTAINERS, b"0:0:644")
        os.setxattr(low / "dir", CONTAINERS, b"0:0:700")
        os.setxattr(low / "dir" / "in", CONTAINERS, b"5:5:600")
        mount = u.fuse_overlayfs_mount if name == "fuse-overlayfs" else u.overlayfuse_mount
        with mount(lay.lowers, lay.upper, lay.work, lay.mnt, extra=("xattr_permissions=2",)):
            r = u.run_as_user([u.python, "-c", USER_SCRIPT, str(lay.mnt)],
                              capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        results[name] = json.loads(r.stdout)
        uppers[name] = os.getxattr(lay.upper / "n", NAME[2]).split(b":")[:2]
        if name == "overlayfuse":  # the copy-up kept the lower's owner, the chmod its mode
            assert os.getxattr(lay.upper / "mine", NAME[2]) == b"%d:%d:640" % (u.uid, u.gid)
            assert os.lstat(lay.upper / "mine").st_uid == u.uid
    ours, theirs = results["overlayfuse"], results["fuse-overlayfs"]
    me = [u.uid, u.gid]
    # 1.10 resets the owner a chmod keeps (fixed in 1.14) on some runs and not on others
    # (the same 1.10-1 binary, the same steps): the chmod's outcome apart
    assert theirs.pop("stat mine after") in ([0, 0, "0o640"], [*me, "0o640"])
    assert ours.pop("stat mine after") == [*me, "0o640"]
    assert ours == theirs, (ours, theirs)
    # the root is the upper's, whose marker holds its real owner: the user's
    assert ours["stat "] == [*me, "0o755"] and ours["stat mine"] == [*me, "0o644"]
    assert ours["stat theirs"] == [0, 0, "0o644"] and ours["stat dir"] == [0, 0, "0o700"]
    assert ours["stat dir/in"] == "EACCES"  # below a dir shown as root's 0700
    assert ours["write theirs (0:0 0644)"] == "EACCES"
    assert ours["list dir (0:0 0700)"] == "EACCES"
    assert ours["create n"] == "ok" and ours["owner n"] == me
    assert ours["chown mine 0:0"] == "EPERM"  # the kernel's check: no CAP_CHOWN
    assert ours["chmod mine 0640"] == "ok" and ours["write mine"] == "ok"
    assert ours["getxattr override"] == "ENODATA" and ours["setxattr override"] == "EPERM"
    assert uppers["overlayfuse"] == uppers["fuse-overlayfs"] == [b"%d" % u.uid, b"%d" % u.gid]


MAP = ("uidmapping=0:100000:65536", "gidmapping=0:100000:65536")


def mapped_script(m: Path) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []

    def step(what: str, ids: tuple[int, int], fn: Callable[..., Any], *args: Any) -> None:
        steps.append((what, as_ids(ids, fn, *args)))

    for name in ("root", "one", "pub"):
        step(f"stat {name}", ROOT, shown, m / name)
    step("chown one 100005:100006", ROOT, os.chown, m / "one", 100005, 100006)
    step("stat one after", ROOT, shown, m / "one")
    step("mapped user creates pub/x", (100003, 100003), touch, m / "pub" / "x")
    step("owner of pub/x", ROOT, lambda p: shown(p)[:2], m / "pub" / "x")
    step("mapped user chowns pub/x to itself", (100003, 100003), os.chown, m / "pub" / "x",
         100003, 100003)
    return steps


@pytest.mark.parametrize("extra", [MAP, ("squash_to_root",), ("squash_to_uid=7", *MAP)],
                         ids=["mapping", "squash_to_root", "squash_to_uid+mapping"])
def test_xattr_permissions_with_mapping_and_squash(open_tmp: Path, extra: tuple[str, ...]) -> None:
    """The override holds on-disk IDs: the mapping and squashing apply on top, as they do
    to real owners (fuse-overlayfs' order); a chown a squash hides still lands in the xattr."""
    results, stored = {}, {}
    for name, mount in MOUNTS.items():
        lay = make_layers(open_tmp / name, n_lowers=1)
        build_lower(lay.lowers[0], containers=False)
        with mount(lay.lowers, lay.upper, lay.work, lay.mnt,
                   extra=("xattr_permissions=2", *extra)):
            results[name] = mapped_script(lay.mnt)
        stored[name] = {p: os.getxattr(lay.upper / p, NAME[2]).split(b":")[:2]
                        for p in ("one", "pub/x")}
    assert results["overlayfuse"] == results["fuse-overlayfs"]
    assert stored["overlayfuse"] == stored["fuse-overlayfs"]
    got = dict(results["overlayfuse"])
    on_disk = {"one": [b"5", b"6"], "pub/x": [b"3", b"3"]} if "uidmapping=0:100000:65536" \
        in extra else {"one": [b"100005", b"100006"], "pub/x": [b"100003", b"100003"]}
    assert stored["overlayfuse"] == on_disk
    if extra == MAP:
        assert got["stat one"] == "(100001, 100001, '0o640')"
        assert got["stat one after"] == "(100005, 100006, '0o640')"
        assert got["owner of pub/x"] == "(100003, 100003)"
    elif extra == ("squash_to_root",):
        assert got["stat one after"] == "(0, 0, '0o640')"
        assert got["owner of pub/x"] == "(0, 0)"
    else:
        assert got["stat one after"] == "(7, 100006, '0o640')"


def test_unprivileged_xattr_permissions_1_is_refused(unprivileged) -> None:  # noqa: ANN001
    """=1 needs privilege (a ``security.*`` xattr): a normal user's mount fails at once, with
    a one-line error, as fuse-overlayfs' does ("write xattr ... to upperdir")."""
    u = unprivileged
    lay = u.make_layers(n_lowers=1, name="one")
    opts = (f"lowerdir={lay.lowers[0]},upperdir={lay.upper},workdir={lay.work},"
            "xattr_permissions=1")
    theirs = u.run_as_user(["fuse-overlayfs", "-o", opts, str(lay.mnt)], capture_output=True,
                           text=True, timeout=60)
    assert theirs.returncode != 0 and NAME[1] in theirs.stderr
    ours = u.run_as_user([u.python, "-m", "overlayfuse", "mount", "--backend", "fuse", "-o",
                          opts, str(lay.mnt)], capture_output=True, text=True, timeout=60)
    assert ours.returncode != 0 and "Traceback" not in ours.stderr
    assert ours.stderr.splitlines() == [
        f"overlayfuse: xattr_permissions=1: cannot write {NAME[1]} on {lay.upper}: "
        "Operation not permitted"], ours.stderr
    assert not mounts_under(lay.root)
    assert NAME[1] not in os.listxattr(lay.upper)


def test_an_upper_of_a_later_fuse_overlayfs_keeps_its_name(open_tmp: Path) -> None:
    """From 1.14, =2 writes ``user.containers.override_stat`` in the upper (and marks its root
    so): such an upper is read, and written on, with that name; a fresh one gets 1.10's."""
    lay = make_layers(open_tmp / "later", n_lowers=1)
    (lay.upper / "f").write_text("f")
    os.setxattr(lay.upper, CONTAINERS, b"0:0:755")
    os.setxattr(lay.upper / "f", CONTAINERS, b"5:6:600")
    with overlayfuse_mount(lay.lowers, lay.upper, lay.work, lay.mnt,
                           extra=("xattr_permissions=2",)):
        assert shown(lay.mnt / "f") == (5, 6, "0o600")
        os.chown(lay.mnt / "f", 7, -1)
        touch(lay.mnt / "g")
        assert shown(lay.mnt / "f") == (7, 6, "0o600")
    assert os.getxattr(lay.upper / "f", CONTAINERS) == b"7:6:600"
    assert os.getxattr(lay.upper / "g", CONTAINERS) == b"0:0:644"
    assert NAME[2] not in os.listxattr(lay.upper) + os.listxattr(lay.upper / "g")
