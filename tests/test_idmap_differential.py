"""The same uid/gid-mapped mount through fuse-overlayfs and overlayfuse: the same owners, errnos.

Identical layers (a lower with entries owned by mapped and unmapped IDs), the mapping podman
passes for ``--uidmap 0:100000:65536``, and one script of stat/create/chown/``ls -n`` steps run
by root, by a mapped user and by an unmapped one.  Every step's outcome, the listings and the
owners stored in the upper must agree, with one deliberate difference: a chown to an ID no
range maps stores the overflow ID on disk in fuse-overlayfs and fails with EINVAL here (see
overlayfuse/idmap.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import outcome
from mounts import fuse_overlayfs_mount, make_layers, overlayfuse_mount

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mapped mounts and setresuid need root"),
    pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="needs fuse-overlayfs"),
]

MAP = ("uidmapping=0:100000:65536", "gidmapping=0:100000:65536")
MAPPED_USER = (100003, 100003)   # container uid 3
UNMAPPED_USER = (200000, 200000)  # outside the mapped range
ROOT = (0, 0)                     # the host's root: not in the mapped range either


class ChildFailed(AssertionError):
    """A step's child crashed instead of giving an outcome: never a result to compare."""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def as_ids(ids: tuple[int, int], fn: Callable[..., Any], *args: Any) -> str:
    """``outcome(fn, *args)`` in a child running as uid/gid ``ids`` (no supplementary groups).

    An errno is an outcome; any other exception, a signal or a non-zero exit of the child is
    not: it raises ChildFailed with the child's traceback, so that a step that crashed on both
    mounts cannot compare equal.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setresgid(ids[1], ids[1], ids[1])
                os.setresuid(ids[0], ids[0], ids[0])
                text, ok = repr(outcome(fn, *args)), True
            except BaseException:
                text, ok = traceback.format_exc(), False
            _write_all(w, text.encode(errors="backslashreplace"))
            status = 0 if ok else 1  # only once the whole outcome is written
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        text = pipe.read().decode(errors="backslashreplace")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        how = (f"killed by signal {-code} ({signal.strsignal(-code)})" if code < 0
               else f"exited with status {code}")
        raise ChildFailed(f"the child running {getattr(fn, '__name__', fn)}{args!r} as "
                          f"{ids} {how}:\n{text}")
    return text


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def touch(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def ls_n(path: Path) -> list[tuple[str, ...]]:
    """``ls -n``'s mode, owner, group and name columns (link counts and times left out)."""
    out = subprocess.run(["ls", "-n", "-A", str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()[1:]
    return [(f[0], f[2], f[3], " ".join(f[8:])) for f in (line.split() for line in out)]


def build_lower(lower: Path) -> None:
    for name, ids in (("root", 0), ("one", 1), ("far", 70000), ("nobody", 65534)):
        (lower / name).write_text(name)
        os.chown(lower / name, ids, ids)
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old")
    os.chown(lower / "dir" / "old", 2, 2)


def script(m: Path) -> list[tuple[str, Any]]:
    """The steps, each with its outcome; run once per mount."""
    steps: list[tuple[str, Any]] = []

    def step(what: str, ids: tuple[int, int], fn: Callable[..., Any], *args: Any) -> None:
        steps.append((what, as_ids(ids, fn, *args)))

    for name in ("root", "one", "far", "nobody", "dir", "dir/old"):
        step(f"stat {name}", ROOT, owner, m / name)
    step("chmod dir 0777", ROOT, os.chmod, m / "dir", 0o777)
    step("root creates rootnew", ROOT, touch, m / "rootnew")
    step("stat rootnew", ROOT, owner, m / "rootnew")
    step("root mkdir newdir", ROOT, os.mkdir, m / "newdir")
    step("mapped creates dir/x", MAPPED_USER, touch, m / "dir" / "x")
    step("mapped mkdir dir/y", MAPPED_USER, os.mkdir, m / "dir" / "y")
    step("mapped symlink dir/z", MAPPED_USER, os.symlink, "x", m / "dir" / "z")
    step("mapped chowns dir/x to another", MAPPED_USER, os.chown, m / "dir" / "x", 100004, -1)
    step("mapped chowns dir/x to itself", MAPPED_USER, os.chown, m / "dir" / "x", 100003, 100003)
    step("mapped chowns dir/old (not its own)", MAPPED_USER, os.chown, m / "dir" / "old",
         100003, -1)
    step("unmapped creates dir/w", UNMAPPED_USER, touch, m / "dir" / "w")
    step("stat dir/w", ROOT, owner, m / "dir" / "w")
    step("root chowns one", ROOT, os.chown, m / "one", 100005, 100006)
    step("root chowns far (unmapped) to mapped root", ROOT, os.chown, m / "far", 100000, 100000)
    step("root chowns symlink dir/z", ROOT, os.lchown, m / "dir" / "z", 100007, 100007)
    step("root chgrp dir/y", ROOT, os.chown, m / "dir" / "y", -1, 100009)
    for name in ("one", "far", "dir/x", "dir/y", "dir/z", "dir/old"):
        step(f"stat {name} after", ROOT, owner, m / name)
    steps.append(("ls -n /", ls_n(m)))
    steps.append(("ls -n dir", ls_n(m / "dir")))
    return steps


def upper_owners(upper: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(upper))] = owner(p)
    return out


def test_mapped_mount_matches_fuse_overlayfs(open_tmp: Path) -> None:
    results, uppers, unmapped_chown = {}, {}, {}
    mounts = {"fuse-overlayfs": fuse_overlayfs_mount, "overlayfuse": overlayfuse_mount}
    for name, mount in mounts.items():
        lay = make_layers(open_tmp / name, n_lowers=1)
        build_lower(lay.lowers[0])
        with mount(lay.lowers, lay.upper, lay.work, lay.mnt, extra=MAP):
            results[name] = script(lay.mnt)
            unmapped_chown[name] = (as_ids(ROOT, os.chown, lay.mnt / "root", 5, 5),
                                    as_ids(ROOT, owner, lay.mnt / "root"))
        uppers[name] = upper_owners(lay.upper)
    ours, theirs = results["overlayfuse"], results["fuse-overlayfs"]
    assert [s[0] for s in ours] == [s[0] for s in theirs]
    differing = [(what, a, b) for (what, a), (_, b) in zip(ours, theirs) if a != b]
    assert not differing, differing
    # what the steps say, so that agreeing on something wrong cannot pass
    got = dict(ours)
    assert got["stat root"] == "(100000, 100000)" and got["stat far"] == "(65534, 65534)"
    assert got["stat nobody"] == "(165534, 165534)"  # on disk 65534: mapped like any ID
    assert got["stat rootnew"] == "(165534, 165534)"  # an unmapped caller: overflow on disk
    assert got["mapped creates dir/x"] == got["mapped mkdir dir/y"] == "'ok'"
    assert got["stat dir/w"] == "(165534, 165534)"  # made by an unmapped user: overflow
    assert got["mapped chowns dir/x to another"] == "'EPERM'"
    assert got["mapped chowns dir/old (not its own)"] == "'EPERM'"
    assert got["stat far after"] == "(100000, 100000)"
    assert ("lrwxrwxrwx", "100007", "100007", "z -> x") in got["ls -n dir"]
    assert got["stat dir/x after"] == "(100003, 100003)"
    assert got["stat one after"] == "(100005, 100006)"
    # the on-disk side: the container's IDs
    assert uppers["overlayfuse"].pop("root", None) is None
    assert uppers["fuse-overlayfs"].pop("root") == (65534, 65534)
    # fuse-overlayfs also marks its new dirs opaque with .wh..wh..opq files
    assert uppers["overlayfuse"] == {k: v for k, v in uppers["fuse-overlayfs"].items()
                                     if not os.path.basename(k).startswith(".wh.")}
    assert uppers["overlayfuse"]["dir/x"] == (3, 3)
    assert uppers["overlayfuse"]["one"] == (5, 6)
    assert uppers["overlayfuse"]["rootnew"] == (65534, 65534)
    # the deliberate difference: fuse-overlayfs stores the overflow ID (then shown as 165534)
    assert unmapped_chown["fuse-overlayfs"] == ("'ok'", "(165534, 165534)")
    assert unmapped_chown["overlayfuse"] == ("'EINVAL'", "(100000, 100000)")


USER_SCRIPT = r"""
import errno, json, os, sys
m = sys.argv[1]
def outcome(fn, *a):
    try:
        r = fn(*a)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok" if r is None else r
def owner(p):
    st = os.lstat(p)
    return [st.st_uid, st.st_gid]
out = {}
out["stat f"] = outcome(owner, m + "/f")
out["create n"] = outcome(lambda: os.close(os.open(m + "/n", os.O_CREAT | os.O_WRONLY, 0o644)))
out["stat n"] = outcome(owner, m + "/n")
out["chown f 0:0"] = outcome(os.chown, m + "/f", 0, 0)
out["chown f 5:5"] = outcome(os.chown, m + "/f", 5, 5)
out["stat f after"] = outcome(owner, m + "/f")
print(json.dumps(out))
"""


@pytest.mark.parametrize("case", ["squash_to_root", "plain", "own-as-root"])
def test_unprivileged_squash_and_mapping_match_fuse_overlayfs(unprivileged, case: str) -> None:  # noqa: ANN001
    """As a normal user (fusermount3, default_permissions): squash_to_root shows root's tree
    (which the kernel then keeps the user from writing); a mapping of the user's own ID to 0
    shows the user's files as root's.  Outcomes and the owners in the upper as fuse-overlayfs."""
    u = unprivileged
    options = {"squash_to_root": ("squash_to_root",), "plain": (),
               "own-as-root": (f"uidmapping={u.uid}:0:1", f"gidmapping={u.gid}:0:1")}[case]
    results, uppers = {}, {}
    for name in ("fuse-overlayfs", "overlayfuse"):
        lay = u.make_layers(n_lowers=1, name=name)
        (lay.lowers[0] / "f").write_text("f")
        os.chown(lay.lowers[0] / "f", u.uid, u.gid)
        mount = u.fuse_overlayfs_mount if name == "fuse-overlayfs" else u.overlayfuse_mount
        with mount(lay.lowers, lay.upper, lay.work, lay.mnt, extra=options):
            r = u.run_as_user([u.python, "-c", USER_SCRIPT, str(lay.mnt)],
                              capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        results[name] = json.loads(r.stdout)
        uppers[name] = upper_owners(lay.upper)
    assert results["overlayfuse"] == results["fuse-overlayfs"]
    assert uppers["overlayfuse"] == uppers["fuse-overlayfs"]
    got, me = results["overlayfuse"], [u.uid, u.gid]
    expected = {
        "squash_to_root": {"stat f": [0, 0], "create n": "EACCES", "stat n": "ENOENT",
                           "chown f 0:0": "EPERM", "chown f 5:5": "EPERM",
                           "stat f after": [0, 0]},
        "plain": {"stat f": me, "create n": "ok", "stat n": me, "chown f 0:0": "EPERM",
                  "chown f 5:5": "EPERM", "stat f after": me},
        "own-as-root": {"stat f": [0, 0], "create n": "EACCES", "stat n": "ENOENT",
                        "chown f 0:0": "EPERM", "chown f 5:5": "EPERM",
                        "stat f after": [0, 0]},
    }[case]
    assert got == expected
