"""``overlayfuse store init --from-tar``: a root filesystem tarball becomes a config's first layer.

Real archives (GNU tar from a tree made as root, Python's tarfile for hostile ones), real
imports through the command line, as root and as the normal user ``ovfuser`` with and without
subordinate ranges.  The layer is compared with the source tree: types, modes, contents,
xattrs, owners, mtimes, hard-link identity.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest

from mounts import REPO, tree_snapshot
from unpriv import Unprivileged, subordinate_ids

CAP = "cap_net_raw=ep"
SUB_START, SUB_COUNT = 900000, 65536  # apart from the other tests' ranges
DEVICE_LINE = "skipped 1 device node (the run's /dev is its own)"


def cli(base: Path, *args: str, user: Unprivileged | None = None
        ) -> subprocess.CompletedProcess[str]:
    if user is not None:
        return user.run([user.python, "-m", "overlayfuse", "store", "--base", str(base), *args],
                        capture_output=True, text=True, timeout=120)
    return subprocess.run([sys.executable, "-m", "overlayfuse", "store", "--base", str(base),
                           *args], capture_output=True, text=True, cwd=REPO)


def make_rootfs(root: Path) -> Path:
    """A small root as root makes it: owners 0, 1, 1000, 65534, setuid and setgid, hard links,
    symlinks, a fifo, xattrs, a file capability, a device, mode-000 and 0555 dirs, ns mtimes."""
    for d in ("etc", "usr/bin", "home/alice", "var/empty", "proc", "dev", "run/lock"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 300)
    (root / "usr/bin/su").write_text("setuid\n")
    (root / "usr/bin/wall").write_text("setgid\n")
    (root / "usr/bin/ping").write_text("capable\n")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    os.link(root / "usr/bin/tool", root / "etc/tool3")
    os.symlink("tool", root / "usr/bin/link")
    os.symlink("/etc/passwd", root / "home/alice/abs")
    (root / "home/alice/notes").write_text("alice\n")
    os.mkfifo(root / "run/fifo")
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(root / "etc/passwd", "user.origin", b"debian\x00\xff")
    os.setxattr(root / "home/alice", "user.dir", b"d")
    subprocess.run(["setcap", CAP, str(root / "usr/bin/ping")], check=True)
    for path, uid, gid in (("home/alice", 1000, 1000), ("home/alice/notes", 1000, 1000),
                           ("home/alice/abs", 1000, 100), ("var/empty", 65534, 65534),
                           ("usr/bin/tool", 1, 1), ("run/fifo", 0, 1)):
        os.chown(root / path, uid, gid, follow_symlinks=False)
    os.chmod(root / "usr/bin/su", 0o4755)
    os.chown(root / "usr/bin/wall", 0, 5)
    os.chmod(root / "usr/bin/wall", 0o2755)
    os.chmod(root / "var/empty", 0o000)
    os.chmod(root / "proc", 0o555)
    os.chmod(root / "run/lock", 0o1777)
    t = 1_600_000_000_123_456_789
    for i, (dirpath, dirs, files) in enumerate(sorted(os.walk(root, topdown=False))):
        for name in files + dirs:
            os.utime(os.path.join(dirpath, name), ns=(t, t + i * 1_000_000_007),
                     follow_symlinks=False)
    os.utime(root, ns=(t, t + 42))
    return root


def snapshot(root: Path) -> tuple[dict[str, Any], dict[str, int], list[list[str]]]:
    """What a layer is made of: tree_snapshot with owners, mtimes, hard-link groups."""
    snap = tree_snapshot(root, owner=True)
    mtimes, inodes = {}, {}
    for rel in snap:
        st = os.lstat(root / rel)
        mtimes[rel] = st.st_mtime_ns
        inodes.setdefault(st.st_ino, []).append(rel)
    return snap, mtimes, sorted(sorted(v) for v in inodes.values() if len(v) > 1)


def without_devices(root: Path) -> tuple[dict[str, Any], dict[str, int], list[list[str]]]:
    snap, mtimes, links = snapshot(root)
    devs = [rel for rel, v in snap.items() if v[0] in ("c", "b")]
    assert devs == ["dev/null"]
    for rel in devs:
        del snap[rel], mtimes[rel]
    return snap, mtimes, links


def gnu_tar(src: Path, out: Path, compress: str = "") -> Path:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "--format=pax", "-C", str(src), "-cf", str(out), *([compress] if compress
                                                                       else []), "."],
                   check=True)
    return out


def the_layer(base: Path) -> Path:
    layers = os.listdir(base / "layers")
    assert len(layers) == 1, layers
    return base / "layers" / layers[0]


def nothing_left(base: Path) -> None:
    """A refused import leaves no config, no layer, no tmp/ entry."""
    assert os.listdir(base / "layers") == []
    assert os.listdir(base / "tmp") == []
    r = cli(base, "configs")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("rootfs") / "root")


# -- as root -------------------------------------------------------------------------------

COMPRESSIONS = {"plain": ("tar", ""), "gzip": ("tar.gz", "--gzip"),
                "xz": ("tar.xz", "--xz"), "zstd": ("tar.zst", "--zstd")}


@pytest.mark.parametrize("kind", list(COMPRESSIONS))
def test_root_import_equals_the_tree(rootfs: Path, tmp_path: Path, kind: str) -> None:
    ext, flag = COMPRESSIONS[kind]
    if kind == "zstd" and shutil.which("zstd") is None:
        pytest.skip("no zstd here: test_zstd_missing_is_one_line covers it")
    archive = gnu_tar(rootfs, tmp_path / f"root.{ext}", flag)
    base = tmp_path / "store"
    r = cli(base, "init", "--from-tar", str(archive))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: imported "), r.stderr
    assert lines[0].endswith(DEVICE_LINE), lines[0]
    layer = the_layer(base)
    want, got = without_devices(rootfs), snapshot(layer)
    assert got[0] == want[0]
    assert got[1] == want[1]
    assert got[2] == want[2] == [["etc/tool3", "usr/bin/tool", "usr/bin/tool2"]]
    assert not os.path.lexists(layer / "dev/null")
    assert cli(base, "snapshots").stdout == "* postinit\n"


def test_python_tarfile_archive(rootfs: Path, tmp_path: Path) -> None:
    """An archive written by Python's tarfile (names without ``./``, GNU format)."""
    archive = tmp_path / "py.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        for name in sorted(os.listdir(rootfs)):
            tf.add(rootfs / name, name)
    base = tmp_path / "store"
    r = cli(base, "init", "--from-tar", str(archive))
    assert r.returncode == 0, r.stderr
    want, got = without_devices(rootfs), snapshot(the_layer(base))
    strip = {rel: v[:4] + v[5:] for rel, v in want[0].items() if rel != "."}  # no xattrs
    assert {rel: v[:4] + v[5:] for rel, v in got[0].items() if rel != "."} == strip
    # a GNU-format header keeps whole seconds only
    assert {k: v // 10**9 for k, v in got[1].items() if k != "."} == \
        {k: v // 10**9 for k, v in want[1].items() if k != "."}
    assert got[2] == want[2]


def test_zstd_missing_is_one_line(rootfs: Path, tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("no zstd to make the archive with")
    archive = gnu_tar(rootfs, tmp_path / "root.tar.zst", "--zstd")
    base = tmp_path / "store"
    r = subprocess.run([sys.executable, "-m", "overlayfuse", "store", "--base", str(base),
                        "init", "--from-tar", str(archive)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PATH": "/nonexistent"})
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"overlayfuse: {archive} is zstd-compressed and the zstd "
                                     "command is missing (Debian's package zstd has it)"]
    nothing_left(base)


# -- hostile archives ----------------------------------------------------------------------

def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
         linkname: str = "", dev: tuple[int, int] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if dev is not None:
        info.devmajor, info.devminor = dev
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _through_symlink(outside: Path) -> Callable[[tarfile.TarFile], None]:
    def build(tf: tarfile.TarFile) -> None:
        _add(tf, "./etc", tarfile.DIRTYPE)
        _add(tf, "./s", tarfile.SYMTYPE, linkname=str(outside))
        _add(tf, "./s/x")
    return build


HOSTILE: dict[str, tuple[Callable[..., None], str]] = {
    "dotdot": (lambda tf, o: _add(tf, "../x"), "names '..'"),
    "dotdot-inside": (lambda tf, o: (_add(tf, "a", tarfile.DIRTYPE), _add(tf, "a/../../x")),
                      "names '..'"),
    "absolute": (lambda tf, o: _add(tf, str(o / "x")), "is an absolute path"),
    "symlinked-parent": (lambda tf, o: _through_symlink(o)(tf), "goes through 's', which is not a directory"),
    "hardlink-outside": (lambda tf, o: (_add(tf, "./f"),
                                        _add(tf, "./h", tarfile.LNKTYPE,
                                             linkname="../../etc/passwd")),
                         "is a hard link to '../../etc/passwd', outside the tree"),
    "hardlink-absolute": (lambda tf, o: _add(tf, "h", tarfile.LNKTYPE, linkname="/etc/passwd"),
                          "outside the tree"),
    "hardlink-later": (lambda tf, o: (_add(tf, "h", tarfile.LNKTYPE, linkname="f"),
                                      _add(tf, "f")), "not an earlier file of the archive"),
    "hardlink-via-symlink": (lambda tf, o: (_add(tf, "s", tarfile.SYMTYPE, linkname="/etc"),
                                            _add(tf, "h", tarfile.LNKTYPE,
                                                 linkname="s/passwd")),
                             "not an earlier file of the archive"),
    "whiteout": (lambda tf, o: (_add(tf, "etc", tarfile.DIRTYPE), _add(tf, "etc/.wh.passwd")),
                 "is a whiteout (.wh.*)"),
    "dir-replaced": (lambda tf, o: (_add(tf, "d", tarfile.DIRTYPE), _add(tf, "d/f"),
                                    _add(tf, "d", tarfile.SYMTYPE, linkname=str(o))),
                     "would replace a directory"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_refused_nothing_left(tmp_path: Path, case: str) -> None:
    build, words = HOSTILE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./", tarfile.DIRTYPE)
        _add(tf, "./first")  # something is unpacked before the bad entry
        build(tf, outside)
    base = tmp_path / "store"
    r = cli(base, "init", "--from-tar", str(archive))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: refusing the archive: "), \
        r.stderr
    assert words in lines[0] and lines[0].endswith("; nothing imported"), lines[0]
    nothing_left(base)
    assert os.listdir(outside) == []
    assert not os.path.lexists(tmp_path / "x")


def test_whiteout_device_only_entry_skipped(tmp_path: Path) -> None:
    """A 0/0 character device (a whiteout in a layer) is skipped like any device, never
    made: the import succeeds with an empty tree."""
    archive = tmp_path / "wh.tar"
    with tarfile.open(archive, "w") as tf:
        _add(tf, "passwd", tarfile.CHRTYPE, dev=(0, 0))
    base = tmp_path / "store"
    r = cli(base, "init", "--from-tar", str(archive))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"overlayfuse: imported 1 entry, 0.0 MiB from "
                                     f"{archive}; {DEVICE_LINE}"]
    assert os.listdir(the_layer(base)) == []


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 1000)
    base = tmp_path / "store"
    r = cli(base, "init", "--from-tar", str(junk))
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("overlayfuse: "), r.stderr
    nothing_left(base)


# -- as a normal user ----------------------------------------------------------------------

def without_cap(snap: dict[str, Any]) -> dict[str, Any]:
    """File capabilities aside: set in a user namespace they are stored for its root."""
    return {rel: v[:4] + (tuple(x for x in v[4] if x[0] != "security.capability"),) + v[5:]
            for rel, v in snap.items()}


def _user_archive(rootfs: Path, u: Unprivileged) -> Path:
    archive = gnu_tar(rootfs, u.home / "root.tar.gz", "--gzip")
    u.chown(archive)
    return archive


def test_user_with_ranges_gets_subordinate_owners(rootfs: Path,
                                                  unprivileged: Unprivileged) -> None:
    u = unprivileged
    start = SUB_START
    archive = _user_archive(rootfs, u)
    base = u.home / "store"
    with subordinate_ids(u.user, start, SUB_COUNT):
        r = cli(base, "init", "--from-tar", str(archive), user=u)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.splitlines()) == 1 and DEVICE_LINE in r.stderr, r.stderr
    want, got = without_devices(rootfs), snapshot(the_layer(base))
    assert ("security.capability" in dict(want[0]["usr/bin/ping"][4])), "precondition"

    def host_id(n: int, own: int) -> int:  # inside ID N is start + N - 1, 0 is the user
        return own if n == 0 else start + n - 1
    mapped = {rel: v[:5] + (host_id(v[5], u.uid), host_id(v[6], u.gid))
              for rel, v in without_cap(want[0]).items()}
    assert without_cap(got[0]) == mapped
    assert got[0]["home/alice"][5:] == (start + 999, start + 999)
    assert got[0]["var/empty"][5:] == (start + 65533, start + 65533)
    assert got[0]["usr/bin/su"][1] == 0o4755 and got[0]["usr/bin/wall"][1] == 0o2755
    assert got[1] == want[1]
    assert got[2] == want[2]
    ping = the_layer(base) / "usr/bin/ping"
    cap = os.getxattr(ping, "security.capability")
    # a v3 capability whose root is the user: effective in the user's namespaces
    assert cap[3] == 3 and int.from_bytes(cap[20:24], "little") == u.uid, cap


def test_user_without_ranges_owns_everything(rootfs: Path, unprivileged: Unprivileged,
                                             no_subids: None) -> None:
    u = unprivileged
    archive = _user_archive(rootfs, u)
    base = u.home / "store"
    r = cli(base, "init", "--from-tar", str(archive), user=u)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].endswith(DEVICE_LINE), r.stderr
    assert lines[1].startswith("overlayfuse: the archive's owners are not kept"), lines[1]
    assert f"no range for {u.user} in /etc/subuid" in lines[1]
    assert "usermod --add-subuids" in lines[1]
    want, got = without_devices(rootfs), snapshot(the_layer(base))
    assert {rel: v[5:] for rel, v in got[0].items()} == {rel: (u.uid, u.gid) for rel in want[0]}
    assert {rel: v[:4] for rel, v in got[0].items()} == {rel: v[:4] for rel, v in want[0].items()}
    assert got[1] == want[1] and got[2] == want[2]
