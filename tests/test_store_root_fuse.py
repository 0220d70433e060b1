"""``store run --backend fuse``: the FUSE daemon runs inside the sandbox's user namespace, so a
command with the tree as ``/`` gets the same root, owners and layers as through the kernel.

As root and as ``ovfuser`` with subordinate ranges: the tree is ``/``; ``chown 1000:1000`` lands
as the 1000th ID of the map on the host; a copy-up keeps a subordinate owner; what one backend
writes (whiteouts, an opaque dir, a renamed file, owners, modes) the other shows alike; and no
daemon or mount outlives a run.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import busybox_tree
from mounts import REPO
from test_store_root import TIMEOUT, Who, host_pids_with, ok
from unpriv import Unprivileged, subordinate_ids

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "touch", "chown", "chmod", "id", "stat", "find",
           "rm", "mv", "md5sum", "sort", "true")
SUB_START, SUB_COUNT = 870000, 65536
# the same listing through either backend: every entry of the tree (not the run's mounts) with
# owner, mode, size and type, then every file's data
LIST = ("cd / && find . -xdev ! -path ./proc ! -path ./dev ! -path ./sys "
        "-exec stat -c '%n %u %g %a %s %F' {} + | sort && "
        "find . -xdev -type f -exec md5sum {} + | sort")
# a lower file owned by 1000:1000 and a lower dir, for the runs to change
BASE = ("mkdir -p /data/gone /data/opq/old && echo sub > /data/sub && echo low > /data/low && "
        "echo o > /data/opq/old/f && touch /data/gone/x && chown 1000:1000 /data/sub && "
        "chmod 640 /data/sub")
# copy-ups, a create with owners, a rename, deletes (whiteouts) and an opaque dir
CHANGE = ("echo more >> /data/sub && chmod 600 /data/low && touch /new && chown 1000:1000 /new "
          "&& mv /data/low /data/moved && rm -r /data/gone && rm -r /data/opq && "
          "mkdir /data/opq && echo fresh > /data/opq/n && chown 2:3 /data/opq/n && "
          "mkdir -p /made/deep && echo d > /made/deep/f && chown -R 1000:1000 /made")


@pytest.fixture(params=["root", "user"])
def who(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Who]:
    if request.param == "root":
        yield Who(None, tmp_path)
        return
    u: Unprivileged = request.getfixturevalue("unprivileged")
    with subordinate_ids(u.user, SUB_START, SUB_COUNT):
        yield Who(u, u.home)


def host_id(uid_map: list[str], inside: int) -> int:
    """The host ID of ``inside`` in a run's ``/proc/self/uid_map`` lines."""
    for line in uid_map:
        first, host, count = (int(n) for n in line.split())
        if first <= inside < first + count:
            return host + inside - first
    raise AssertionError(f"{inside} is not mapped: {uid_map}")


def init(who: Who) -> None:
    src = who.home / f"src-{uuid.uuid4().hex[:6]}"
    busybox_tree(src, APPLETS)
    ok(who.store("init", "--from", str(who.own(src))))


def run(who: Who, backend: str, script: str) -> str:
    r = who.store("run", "--backend", backend, "--", "sh", "-c", script)
    assert r.returncode == 0, f"{backend}: {script[:40]}: {r.stderr}"
    return r.stdout


def kernel_name(who: Who) -> str:
    return "kernel" if who.user is None else "kernel-userns"


def upper_with(who: Who, rel: str) -> Path:
    found = [d for d in (who.base / "layers").iterdir() if os.path.lexists(d / rel)]
    assert found, rel
    return max(found, key=lambda d: d.stat().st_mtime_ns)


def layer_markers(layer: Path) -> tuple[object, ...]:
    """The whiteouts of data/gone and data/low, and data/opq's overlay xattrs (read as root)."""
    gone, low = os.lstat(layer / "data/gone"), os.lstat(layer / "data/low")
    opq = layer / "data/opq"
    names = sorted(n for n in os.listxattr(opq) if ".overlay." in n)
    value = os.getxattr(opq, names[0]) if names else None
    return (stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0,
            stat.S_ISCHR(low.st_mode) and low.st_rdev == 0, value, names)


def nothing_left(who: Who) -> None:
    """No daemon naming the store runs, and no mount of it (host's view)."""
    assert host_pids_with(str(who.base)) == []
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if str(who.base) in line] == []


def test_fuse_run_has_the_tree_as_root_with_every_mapped_id(who: Who) -> None:
    init(who)
    run(who, "fuse", BASE)  # on layers no kernel has marked yet
    ok(who.store("snapshot", "base"))
    out = run(who, "fuse", "pwd; ls /; id -u; cat /proc/self/uid_map; echo --; "
              "cat /proc/self/gid_map; " + CHANGE
              + "; stat -c '%n %u %g %a' /data/sub /new /data/opq/n")
    lines = out.splitlines()
    assert lines[0] == "/"
    assert lines[1:9] == ["bin", "data", "dev", "etc", "proc", "root", "sys", "tmp"]
    assert lines[9] == "0"
    sep = lines.index("--")
    uid_map = [" ".join(x.split()) for x in lines[10:sep]]
    gid_map = [" ".join(x.split()) for x in lines[sep + 1:-3]]
    if who.user is None:
        assert uid_map == ["0 0 4294967295"]
    else:  # the user, then the subordinate ranges (/etc/subuid, /etc/subgid)
        assert uid_map[0] == f"0 {who.user.uid} 1" and len(uid_map) > 1
        assert gid_map[0] == f"0 {who.user.gid} 1" and len(gid_map) > 1
    assert lines[-3:] == ["/data/sub 1000 1000 640", "/new 1000 1000 644",
                          "/data/opq/n 2 3 644"]
    layer = upper_with(who, "new")
    k = host_id(uid_map, 1000), host_id(gid_map, 1000)
    for rel in ("new", "data/sub", "made/deep/f"):
        st = os.lstat(layer / rel)
        assert (rel, st.st_uid, st.st_gid) == (rel, *k)
    st = os.lstat(layer / "data/opq/n")
    assert (st.st_uid, st.st_gid) == (host_id(uid_map, 2), host_id(gid_map, 3))
    assert (layer / "data/sub").read_text() == "sub\nmore\n"
    nothing_left(who)


def test_fuse_and_kernel_write_layers_the_other_reads_alike(who: Who) -> None:
    init(who)
    kernel = kernel_name(who)
    run(who, kernel, BASE)
    ok(who.store("snapshot", "base"))
    views: dict[tuple[str, str], str] = {}
    markers: dict[str, tuple[object, ...]] = {}
    for writer in ("fuse", kernel):
        ok(who.store("rollback", "base"))
        run(who, writer, CHANGE)
        markers[writer] = layer_markers(upper_with(who, "data/opq/n"))
        for reader in ("fuse", kernel):
            views[writer, reader] = run(who, reader, LIST)
    first = views["fuse", "fuse"]
    assert "./data/opq/n 2 3 644 6 regular file" in first
    assert "./data/gone" not in first and "./data/opq/old" not in first
    assert "./data/moved" in first and "./data/low" not in first
    assert views == {key: first for key in views}
    # the same format on disk: a 0/0 whiteout, the opaque marker in the namespace the kernel
    # uses there (trusted as root, user in a user namespace)
    prefix = "trusted" if who.user is None else "user"
    assert markers["fuse"] == markers[kernel] == (
        True, True, b"y", [f"{prefix}.overlay.opaque"]), markers
    nothing_left(who)



def test_fuse_daemon_runs_in_the_commands_namespaces_with_the_hosts_root(who: Who) -> None:
    """The daemon is in the command's user and PID namespaces (so every mapped ID is its
    own), yet keeps the host's root: the sandbox's pivot_root must not move it onto the
    tree it serves (any path it resolved later would then go through its own mount)."""
    init(who)
    tag = f"{uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000 + 1}"  # sleep's unique argument
    argv = ["-m", "overlayfuse", "store", "--base", str(who.base), "run", "--backend", "fuse",
            "--", "sh", "-c", f"exec sleep {tag}"]
    kw: dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if who.user is None:
        proc = subprocess.Popen([sys.executable, *argv], cwd=who.home,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), **kw)
    else:
        proc = who.user.popen([who.user.python, *argv], **kw)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (sleeper := host_pids_with(f"sleep\0{tag}")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemons = [p for p in host_pids_with(str(who.base))
                   if b"mount\0--backend\0fuse" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(daemons) == 1 and len(sleeper) == 1, (daemons, sleeper)
        daemon, command = daemons[0], sleeper[0]
        for ns in ("user", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{daemon}/ns/{ns}") == os.readlink(
                f"/proc/{command}/ns/{ns}"), ns
        if who.user is not None:
            assert os.readlink(f"/proc/{daemon}/ns/user") != os.readlink("/proc/self/ns/user")
        # a mount namespace of its own, where / is still the host's
        assert os.readlink(f"/proc/{daemon}/ns/mnt") != os.readlink(f"/proc/{command}/ns/mnt")
        host_root, seen = os.stat("/"), os.stat(f"/proc/{daemon}/root/")
        assert (seen.st_dev, seen.st_ino) == (host_root.st_dev, host_root.st_ino)
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + 15
    nothing_left(who)


def test_auto_runs_fuse_in_the_sandbox_where_the_kernel_cannot_show_the_layers(who: Who) -> None:
    """A lower dir renamed through FUSE is a redirect, which the kernel cannot follow with
    userxattr: for a normal user ``auto`` then runs the FUSE daemon in the sandbox (as root
    the kernel follows it)."""
    init(who)
    run(who, "fuse", BASE)
    ok(who.store("snapshot", "base"))
    run(who, "fuse", "mv /data/opq /data/renamed && chown 7:8 /data/renamed/old/f")
    r = who.store("run", "-v", "--", "sh", "-c",
                  "ls /data; stat -c '%n %u %g' /data/renamed/old/f; cat /data/renamed/old/f")
    assert r.returncode == 0, r.stderr
    want = "backend kernel (auto" if who.user is None else "backend fuse (auto"
    assert want in r.stderr, r.stderr
    assert r.stdout.splitlines() == ["gone", "low", "renamed", "sub",
                                     "/data/renamed/old/f 7 8", "o"]
    nothing_left(who)
