"""Many users on one root mount (allow_other): the kernel's overlayfs decides who may do what.

Root mounts the same layers twice, with the kernel's overlayfs and with overlayfuse (as root
it adds ``allow_other,default_permissions``); two unprivileged users then try the same
operations in each (tests/perm_ops.py) and must get the same results: mode bits, a sticky
``/tmp``-like dir, a setgid dir, the umask, chown/chmod by non-owners, the setuid bit cleared
by a write, O_NOATIME, ``user.*`` xattrs on files they do not own, utime.  And a normal user's
own mount keeps other users out unless ``allow_other`` is given and /etc/fuse.conf allows it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import kernel_overlay, overlayfuse_mount
from unpriv import Unprivileged, ensure_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

HERE = Path(__file__).resolve().parent


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A dir under /tmp that every user can reach (pytest's own tmp dirs are mode 700)."""
    d = Path(tempfile.mkdtemp(prefix="ovf-users-", dir="/tmp"))
    os.chmod(d, 0o755)
    shutil.copy(HERE / "perm_ops.py", d / "perm_ops.py")
    os.chmod(d / "perm_ops.py", 0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _build_lower(low: Path, a: tuple[int, int], b: tuple[int, int]) -> None:
    def f(path: str, mode: int, owner: tuple[int, int] = (0, 0), data: bytes = b"data") -> None:
        p = low / path
        p.write_bytes(data)
        os.chown(p, *owner)
        os.chmod(p, mode)

    def d(path: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
        p = low / path
        p.mkdir()
        os.chown(p, *owner)
        os.chmod(p, mode)

    os.chmod(low, 0o755)
    d("pub", 0o755)
    f("pub/ro", 0o644)
    f("pub/secret", 0o600)
    d("a", 0o755, a)
    f("a/f", 0o644, a)
    f("a/priv", 0o600, a)
    f("a/suid", 0o4755, a)
    f("a/sgid", 0o2775, a)
    d("x", 0o700, a)
    f("x/in", 0o644, a)
    d("tmp", 0o1777)
    f("tmp/af", 0o666, a)
    f("tmp/bf", 0o666, b)
    d("sg", 0o2777, (0, b[1]))
    f("shared", 0o666, a)
    os.setxattr(low / "shared", "user.k", b"v")


def _ops(me: str, other: tuple[int, int]) -> list[list]:
    return [
        ["read", "pub/ro"], ["read", "pub/secret"], ["read", "a/priv"], ["listdir", "x"],
        ["read", "x/in"],
        ["append", "a/f"], ["append", "tmp/af"], ["append", "tmp/bf"], ["append", "pub/ro"],
        ["create", "pub/new", 0o644], ["create", f"a/new_{me}", 0o644],
        ["create", f"tmp/new_{me}", 0o666], ["create", f"tmp/um_{me}", 0o666, 0o027],
        ["create", f"sg/new_{me}", 0o664], ["mkdir", f"sg/d_{me}", 0o775],
        ["mkdir", f"sg/d_{me}/sub", 0o755],
        ["append", "a/suid"], ["append", "a/sgid"],
        ["noatime", "pub/ro"], ["noatime", "a/f"],
        ["setxattr", "shared", "user.mine"], ["getxattr", "shared", "user.k"],
        ["setxattr", "tmp", "user.mine"], ["setxattr", "pub/ro", "user.mine"],
        ["utime-now", "shared"], ["utime-set", "shared"], ["utime-set", "a/f"],
        ["truncate", "pub/ro"], ["truncate", "shared"],
        ["chmod", "a/f", 0o600], ["chmod", "pub/ro", 0o666],
        ["chown", "a/priv", other[0], -1], ["chown", "a/priv", -1, 0],
        ["chown", "a/priv", -1, other[1]],
        ["link", "pub/secret", f"tmp/l_{me}"], ["link", "tmp/af", f"tmp/l2_{me}"],
        ["unlink", "tmp/bf"], ["rename", "tmp/af", "tmp/af2"], ["unlink", f"tmp/new_{me}"],
        ["rmdir", "x"], ["rename", "a/f", "pub/f"], ["unlink", "a/priv"],
    ]


def _run_as(uid: int, gid: int, mnt: Path, ops_file: Path, script: Path) -> list:
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                        "/usr/bin/python3", str(script), str(ops_file)],
                       cwd=mnt, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_two_users_get_the_kernels_permission_answers(shared_dir: Path) -> None:
    a, b = ensure_user("ovfusera"), ensure_user("ovfuserb")
    results: dict[tuple[str, str], list] = {}
    for me, ids, other in (("a", a, b), ("b", b, a)):
        ops_file = shared_dir / f"ops_{me}.json"
        ops = _ops(me, other)
        ops_file.write_text(json.dumps(ops))
        os.chmod(ops_file, 0o644)
        for system in ("kernel", "overlayfuse"):
            base = shared_dir / f"{system}_{me}"
            low, up, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
            for p in (low, up, work, mnt):
                p.mkdir(parents=True)
            os.chmod(base, 0o755)
            _build_lower(low, a, b)
            ctx = (kernel_overlay([low], up, work, mnt) if system == "kernel"
                   else overlayfuse_mount([low], up, work, mnt))
            with ctx:
                results[(me, system)] = _run_as(*ids, mnt, ops_file, shared_dir / "perm_ops.py")
            # the lower is never touched, whatever a user tried
            assert (low / "pub/ro").read_bytes() == b"data"
        kernel, ours = results[(me, "kernel")], results[(me, "overlayfuse")]
        diffs = [(op, k, o) for op, k, o in zip(ops, kernel, ours) if k != o]
        assert diffs == [], f"user {me}: (op, kernel, overlayfuse)"
    # the runs did exercise refusals, not only successes
    assert {"EACCES", "EPERM"} <= {r for rs in results.values() for r in rs if isinstance(r, str)}


def test_a_users_mount_keeps_other_users_out(unprivileged: Unprivileged) -> None:
    """Without allow_other another user (root too) gets EACCES; with it, where /etc/fuse.conf
    has user_allow_other, the other user gets in and meets the files' own permissions."""
    u = unprivileged
    other = ensure_user("ovfuserb")
    ly = u.make_layers(1)
    (ly.lowers[0] / "f").write_text("hello")
    os.chmod(ly.lowers[0] / "f", 0o644)
    (ly.lowers[0] / "p").write_text("private")
    os.chmod(ly.lowers[0] / "p", 0o600)
    u.chown(ly.lowers[0] / "f", ly.lowers[0] / "p")
    probe = ["/usr/bin/python3", "-c",
             "import sys,errno\nfor p in sys.argv[1:]:\n try: open(p).read(); print('ok')\n"
             " except OSError as e: print(errno.errorcode[e.errno])"]

    def as_other() -> list[str]:
        r = subprocess.run(["setpriv", f"--reuid={other[0]}", f"--regid={other[1]}",
                            "--clear-groups", "--", *probe, str(ly.mnt / "f"), str(ly.mnt / "p")],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.split()

    with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt):
        assert as_other() == ["EACCES", "EACCES"]
    conf = Path("/etc/fuse.conf")
    saved = conf.read_bytes() if conf.exists() else None
    try:
        conf.write_text("user_allow_other\n")
        with u.overlayfuse_mount(ly.lowers, ly.upper, ly.work, ly.mnt, extra=("allow_other",)):
            assert as_other() == ["ok", "EACCES"]
    finally:
        if saved is None:
            conf.unlink()
        else:
            conf.write_bytes(saved)
