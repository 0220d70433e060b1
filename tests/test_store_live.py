"""A mounted config stays mounted: ``store snapshot`` through the mount's FUSE daemon.

An editor keeps a file open for writing across a snapshot and writes on; four writers append
timestamped records during twenty snapshots in a row; the daemon or the command is SIGKILLed
at each stage of a switch; another user tries to reach the daemon.  What holds: the mount
point, its device and mount ID stay; a snapshot has every record acknowledged before it began
and none begun after it returned; a frozen layer's fingerprint never changes; after a kill
the catalog is the state before or after, ``gc`` finds nothing missing and the next mount
works.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import REPO
from test_store_root import TIMEOUT, Who, ok
from unpriv import Unprivileged

from overlayfuse import LayerStore
from overlayfuse.store import catalog as cat

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

FAULT_ENV = "OVERLAYFUSE_SWITCH_FAULT"


def ovf(who: Who, *args: str, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``overlayfuse store`` as root, with extra environment (a fault to inject)."""
    return subprocess.run([sys.executable, "-m", "overlayfuse", "store", "--base",
                           str(who.base), *args], capture_output=True, text=True, input=input,
                          timeout=TIMEOUT, cwd=who.home,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def mount_identity(mnt: Path) -> tuple[str, str]:
    """(mount ID, device) of the mount on ``mnt`` in /proc/self/mountinfo."""
    found = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4] == str(mnt)]
    assert len(found) == 1, found
    return found[0][0], found[0][2]


def fingerprint(layer: Path) -> str:
    """Names, types, modes, owners, sizes, data, xattrs, mtimes and ctimes of a layer dir: a
    frozen layer keeps every one of them (a ctime moves with any change, xattrs included)."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(layer)):
        dirs.sort()
        for name in [""] + sorted(dirs + files):
            p = os.path.join(d, name) if name else d
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, layer)} {st.st_mode:o} {st.st_uid} {st.st_gid} "
                     f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
            for x in sorted(os.listxattr(p, follow_symlinks=False)):
                h.update(x.encode() + os.getxattr(p, x, follow_symlinks=False))
            if stat.S_ISREG(st.st_mode):
                h.update(Path(p).read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
    return h.hexdigest()


def refs(who: Who) -> dict[str, str]:
    store = LayerStore(str(who.base))
    try:
        return store.config("default").refs()
    finally:
        store.close()


def layer_dir(who: Who, layer: str) -> Path:
    return who.base / "layers" / layer


def unmount(who: Who, mnt: Path) -> None:
    if os.path.ismount(mnt) or any(line.split()[4] == str(mnt) for line in
                                   Path("/proc/self/mountinfo").read_text().splitlines()):
        r = ovf(who, "umount", str(mnt))
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(params=["plain", "writeback"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Who, Path]]:
    """A config (a busybox tree) mounted writable through FUSE by ``store mount``; with the
    kernel's writeback cache too, where a write is acknowledged before the daemon has it."""
    who = Who(None, tmp_path)
    who.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"OVERLAYFUSE_WRITEBACK": "1"} if request.param == "writeback" else None
    ok(ovf(who, "mount", "--backend", "fuse", str(mnt), env=env))
    try:
        yield who, mnt
    finally:
        unmount(who, mnt)


EDITOR = r"""
import os, sys
path, cwd = sys.argv[1], sys.argv[2]
os.chdir(cwd)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"before\n")
print("wrote", flush=True)
sys.stdin.readline()
assert os.pread(fd, 7, 0) == b"before\n"   # a read first: the handle now reads the frozen copy
os.write(fd, b"after\n")
with open("made-in-cwd", "w") as f:   # the cwd still works
    f.write("cwd\n")
print("wrote", flush=True)
sys.stdin.readline()
"""


def test_editor_writes_across_snapshot(mounted: tuple[Who, Path]) -> None:
    who, mnt = mounted
    (mnt / "work").mkdir()
    identity = mount_identity(mnt)
    editor = subprocess.Popen([sys.executable, "-c", EDITOR, str(mnt / "doc.txt"),
                               str(mnt / "work")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert editor.stdout.readline() == "wrote\n"
        reader = os.open(mnt / "doc.txt", os.O_RDONLY)  # opened before, read after
        try:
            t = time.monotonic()
            ok(ovf(who, "snapshot", "s1"))
            took = time.monotonic() - t
            s1 = refs(who)["s1"]
            assert refs(who)[cat.UPPER] != s1
            frozen = fingerprint(layer_dir(who, s1))
            editor.stdin.write("go\n")
            editor.stdin.flush()
            assert editor.stdout.readline() == "wrote\n"
            assert (mnt / "doc.txt").read_text() == "before\nafter\n"
            assert os.pread(reader, 100, 0) == b"before\nafter\n"
        finally:
            os.close(reader)
        assert (mnt / "work" / "made-in-cwd").read_text() == "cwd\n"
        shown = ok(ovf(who, "run", "--snapshot", "s1", "--", "cat", "/doc.txt"))
        assert shown == "before\n"
        assert not (layer_dir(who, s1) / "work" / "made-in-cwd").exists()
        assert (layer_dir(who, s1) / "doc.txt").read_text() == "before\n"
        editor.stdin.write("done\n")
        editor.stdin.flush()
        assert editor.wait(timeout=TIMEOUT) == 0
        ok(ovf(who, "snapshot", "s2"))
        assert fingerprint(layer_dir(who, s1)) == frozen
        assert mount_identity(mnt) == identity
        shown = ok(ovf(who, "run", "--snapshot", "s2", "--", "cat", "/doc.txt",
                       "/work/made-in-cwd"))
        assert shown == "before\nafter\ncwd\n"
        assert took < 30, took
    finally:
        editor.kill()
        editor.wait()


OPEN_FOR_WRITE = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)   # copies the frozen file up
print("%.9f" % time.monotonic(), flush=True)
os.pwrite(fd, b"X", 0)
os.close(fd)
"""
BIG = 512 << 20


def test_copy_up_in_flight(tmp_path: Path) -> None:
    """A snapshot asked while a big copy-up runs (in a worker thread) waits for it: the copy
    is never split between two uppers, and the open that caused it succeeds."""
    who = Who(None, tmp_path)
    who.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(ovf(who, "mount", "--backend", "fuse", str(mnt)))
    try:
        with open(mnt / "big", "wb") as f:
            chunk = b"y" * (1 << 20)
            for _ in range(BIG >> 20):
                f.write(chunk)
        ok(ovf(who, "snapshot", "s0"))
        work = who.base / "work" / refs(who)[cat.UPPER] / "work"
        opener = subprocess.Popen([sys.executable, "-c", OPEN_FOR_WRITE, str(mnt / "big")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not os.listdir(work):   # the copy's temp file: the copy-up is under way
                assert opener.poll() is None and time.monotonic() < deadline
                time.sleep(0.001)
            # from this process: no interpreter start between seeing the copy and the switch
            store = LayerStore(str(who.base))
            try:
                asked = time.monotonic()
                store.config("default").snapshot("s1")
            finally:
                store.close()
            frozen = fingerprint(layer_dir(who, refs(who)["s1"]))
            out, _ = opener.communicate(timeout=TIMEOUT)
            assert opener.returncode == 0, "the open that copied the file up failed"
            opened = float(out)
            assert opened > asked, "the copy-up was over before the snapshot was asked"
        finally:
            opener.kill()
            opener.wait()
        # s1 holds the whole copy (the switch waited for it), never the write after it
        copied = layer_dir(who, refs(who)["s1"]) / "big"
        assert copied.stat().st_size == BIG
        with open(copied, "rb") as f:
            assert f.read(2) == b"yy"
        with open(mnt / "big", "rb") as f:
            assert f.read(2) == b"Xy"
        assert fingerprint(layer_dir(who, refs(who)["s1"])) == frozen
    finally:
        unmount(who, mnt)


def test_copy_up_raced_by_a_setattr(tmp_path: Path) -> None:
    """A file open for writing across a snapshot is copied up at its next change: a big copy
    runs in a worker thread, and a setattr (the writeback cache sends them for the times)
    copies up at once meanwhile.  The slow copy must not then replace the one that took the
    change: the times set stay, in the upper itself."""
    who = Who(None, tmp_path)
    who.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(ovf(who, "mount", "--backend", "fuse", str(mnt)))
    try:
        with open(mnt / "big", "wb") as f:
            chunk = b"y" * (1 << 20)
            for _ in range(BIG >> 20):
                f.write(chunk)
        ok(ovf(who, "snapshot", "s0"))
        upper = refs(who)[cat.UPPER]
        work = who.base / "work" / upper / "work"
        opener = subprocess.Popen([sys.executable, "-c", OPEN_FOR_WRITE, str(mnt / "big")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not os.listdir(work):   # the slow copy is under way
                assert opener.poll() is None and time.monotonic() < deadline
                time.sleep(0.001)
            os.utime(mnt / "big", (1234567, 1234567))   # copies up at once
            out, _ = opener.communicate(timeout=TIMEOUT)
            assert opener.returncode == 0, "the open that copied the file up failed"
        finally:
            opener.kill()
            opener.wait()
        st = os.stat(layer_dir(who, upper) / "big")
        assert st.st_atime == 1234567 and st.st_size == BIG   # (the write moved the mtime)
        with open(mnt / "big", "rb") as f:
            assert f.read(2) == b"Xy"
    finally:
        unmount(who, mnt)


WRITER = r"""
import os, sys, time
path, acks, stop = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
out = open(acks, "w", buffering=1)
n = 0
while not os.path.exists(stop):
    begun = time.monotonic()
    os.write(fd, b"%d %.9f\n" % (n, begun))
    out.write("%d %.9f\n" % (n, time.monotonic()))   # acknowledged: write() returned
    n += 1
    time.sleep(0.002)
os.close(fd)
"""


def test_writers_during_twenty_snapshots(mounted: tuple[Who, Path], tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    who, mnt = mounted
    writeback = "writeback" in request.node.name
    stop = tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / f"log{i}"),
                                 str(tmp_path / f"acks{i}"), str(stop)]) for i in range(4)]
    windows: list[tuple[str, float, float]] = []
    try:
        time.sleep(0.3)
        for k in range(20):
            begun = time.monotonic()
            ok(ovf(who, "snapshot", f"s{k}"))
            windows.append((f"s{k}", begun, time.monotonic()))
        frozen = {name: fingerprint(layer_dir(who, refs(who)[name])) for name, _, _ in windows}
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=TIMEOUT)
    assert all(w.returncode == 0 for w in writers)
    acks = [[tuple(map(float, line.split())) for line in
             (tmp_path / f"acks{i}").read_text().splitlines()] for i in range(4)]
    assert all(len(a) > 20 for a in acks), [len(a) for a in acks]
    snap = tmp_path / "snap"
    snap.mkdir()
    store = LayerStore(str(who.base))
    try:
        for name, begun, ended in windows:
            with store.config("default").mount(str(snap), "fuse", snapshot=name):
                for i in range(4):
                    log = snap / f"log{i}"
                    data = log.read_bytes() if log.exists() else b""
                    acked = sum(1 for _, t in acks[i] if t < begun)
                    if writeback:
                        # pages written back while the switch ran may land on either side,
                        # in any order: only what came before the command is whole
                        lines = data.split(b"\n")[:acked]
                    else:
                        # whole records, in order, none missing; a write still in progress
                        # may be cut where the kernel cut it into requests: at a page it does
                        # not hold (each request itself is applied whole)
                        assert data.endswith(b"\n") or len(data) % 4096 == 0, name
                        lines = data.split(b"\n")[:data.count(b"\n")]
                    records = [tuple(map(float, line.split())) for line in lines]
                    assert [int(r[0]) for r in records] == list(range(len(records))), name
                    # every record acknowledged before the snapshot began is in it
                    assert len(records) >= acked, (name, i, len(records), acked)
                    # and none begun after it returned (a whole record in a partial tail too)
                    tail = [line.split() for line in data.split(b"\n")[len(records):]
                            if b"\0" not in line and len(line.split()) == 2]
                    assert all(float(t) < ended for _, t in records + tail), (name, i)
    finally:
        store.close()
    for i in range(4):
        final = (mnt / f"log{i}").read_text().splitlines()
        assert [int(line.split()[0]) for line in final] == list(range(len(acks[i])))
    for name, _, _ in windows:
        assert fingerprint(layer_dir(who, refs(who)[name])) == frozen[name], name


def check_consistent(who: Who) -> None:
    """``gc`` finds every layer the catalog names, and nothing else in layers/."""
    r = ovf(who, "gc")
    assert r.returncode == 0 and "MISSING" not in r.stdout, r.stdout + r.stderr
    store = LayerStore(str(who.base))
    try:
        conn = store.db()
        known = cat.layer_ids(conn)
        assert not conn.execute("SELECT * FROM switches").fetchall()
        assert cat.ref(conn, "default", cat.NEXT) is None
    finally:
        store.close()
    on_disk = set(os.listdir(who.base / "layers"))
    assert on_disk == known


@pytest.mark.parametrize("op,who_dies,stage,after", [
    ("snapshot", "daemon", "received", True), ("snapshot", "daemon", "synced", True),
    ("snapshot", "daemon", "switched", True), ("snapshot", "command", "recorded", False),
    ("snapshot", "command", "replied", True),
    ("rollback", "daemon", "received", True), ("rollback", "daemon", "switched", True),
    ("rollback", "command", "recorded", False), ("rollback", "command", "replied", True)])
def test_killed_during_a_switch(tmp_path: Path, op: str, who_dies: str, stage: str,
                                after: bool) -> None:
    """SIGKILL at each stage of a switch: the store is in the state before or after it (the
    daemon's death leaves the old upper complete: after), gc finds it whole, and the mount
    (mounted again if its daemon died) goes on."""
    who = Who(None, tmp_path)
    who.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fault = {FAULT_ENV: stage}
    ok(ovf(who, "mount", "--backend", "fuse", str(mnt)))
    try:
        (mnt / "kept").write_text("written before\n")
        ok(ovf(who, "snapshot", "s0"))
        (mnt / "later").write_text("after s0\n")
        old_upper = refs(who)[cat.UPPER]
        s0 = refs(who)["s0"]
        args = ("snapshot", "s1") if op == "snapshot" else ("rollback", "s0")
        if who_dies == "daemon":   # its daemon is to die at the stage: mounted with the fault
            unmount(who, mnt)
            ok(ovf(who, "mount", "--backend", "fuse", str(mnt), env=fault))
            old_upper = refs(who)[cat.UPPER]
        r = ovf(who, *args, env=fault if who_dies == "command" else None)
        assert r.returncode != 0
        if who_dies == "command":
            assert r.returncode == -signal.SIGKILL
        else:
            assert "is dead" in r.stderr, r.stderr
        check_consistent(who)
        if who_dies == "daemon":   # gc took the dead daemon's socket out
            assert not list((who.base / "run").iterdir())
        now = refs(who)
        if op == "snapshot" and after:   # the old upper is s1 and current, a fresh upper on it
            assert now["s1"] == now[cat.CURRENT] == old_upper != now[cat.UPPER]
            assert (layer_dir(who, now["s1"]) / "later").read_text() == "after s0\n"
        elif op == "rollback" and after:   # s0 is current, a fresh upper on it
            assert now[cat.CURRENT] == s0 and now[cat.UPPER] not in (old_upper, s0)
            assert not (who.base / "layers" / old_upper).exists()
        else:       # the state before
            assert "s1" not in now and now[cat.UPPER] == old_upper
        if who_dies == "daemon":   # the next mount takes the dead one down first
            ok(ovf(who, "mount", "--backend", "fuse", str(mnt)))
        # the mount shows the state the catalog says: "later" went with a rollback
        shown = (mnt / "later").read_text() if (mnt / "later").exists() else None
        assert shown == (None if op == "rollback" and after else "after s0\n")
        assert (mnt / "kept").read_text() == "written before\n"
        (mnt / "more").write_text("after the kill\n")
        ok(ovf(who, "snapshot", "s2"))
        check_consistent(who)
        shown = ok(ovf(who, "run", "--snapshot", "s2", "--", "cat", "/kept", "/more"))
        assert shown == "written before\nafter the kill\n"
    finally:
        unmount(who, mnt)


REACH = r"""
import json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    os.chdir(os.path.dirname(sys.argv[1]))    # a store's path may be too long for sun_path
    s.connect(os.path.basename(sys.argv[1]))
except OSError as e:
    print(json.dumps({"connect": e.strerror}))
    sys.exit(0)
time.sleep(float(sys.argv[2]))   # a slow client: the daemon may answer before it is asked
s.sendall(b'{"op": "ping"}\n')
print(s.makefile().readline().strip() or json.dumps({"reply": None}))
"""


def ask_as_root(sock: Path) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:
        os.chdir(sock.parent)
        s.connect(sock.name)
    finally:
        os.chdir(cwd)
    with s:
        s.sendall(b'{"op": "ping"}\n')
        return json.loads(s.makefile().readline())


def test_another_user_cannot_switch(unprivileged: Unprivileged) -> None:
    home = unprivileged.home / "root-side"   # a path the other user can walk to
    home.mkdir(mode=0o755)
    who = Who(None, home)
    who.init()
    mnt = home / "mnt"
    mnt.mkdir()
    ok(ovf(who, "mount", "--backend", "fuse", str(mnt)))
    try:
        socks = list((who.base / "run").iterdir())
        assert len(socks) == 1 and stat.S_IMODE(socks[0].stat().st_mode) == 0o600
        script = home / "reach.py"
        script.write_text(REACH)
        script.chmod(0o644)
        r = unprivileged.run([unprivileged.python, str(script), str(socks[0]), "0"],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert json.loads(r.stdout) == {"connect": "Permission denied"}, r.stdout + r.stderr
        # with the socket opened to all, the daemon itself refuses by the peer's credentials
        os.chmod(who.base / "run", 0o755)
        os.chmod(socks[0], 0o666)
        for delay in ("0", "0.5"):
            r = unprivileged.run([unprivileged.python, str(script), str(socks[0]), delay],
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert r.returncode == 0 and r.stdout, r.stderr
            reply = json.loads(r.stdout)
            assert reply["ok"] is False and "may not control" in reply["error"], r.stdout
        # root may, and the mount is unharmed
        assert ask_as_root(socks[0])["ok"] is True
        (mnt / "f").write_text("x\n")
        ok(ovf(who, "snapshot", "s1"))
        assert (layer_dir(who, refs(who)["s1"]) / "f").read_text() == "x\n"
    finally:
        unmount(who, mnt)


def all_fingerprints(who: Who, but: str | None = None) -> dict[str, str]:
    """Every layer's fingerprint (``but`` the live upper)."""
    return {x: fingerprint(layer_dir(who, x)) for x in os.listdir(who.base / "layers")
            if x != but}


@pytest.mark.parametrize("how", ["rollback", "clean"])
def test_rollback_and_clean_while_in_use(mounted: tuple[Who, Path], how: str) -> None:
    """The mount shows the target state at once (the kernel's caches told); a cwd inside
    and open files keep working; a file gone with the switch goes on as an unlinked one."""
    who, mnt = mounted
    d = mnt / "d"
    d.mkdir()
    (d / "a").write_text("v1\n")
    (d / "z").write_text("z\n")
    # a file open for writing, frozen in s0, then unlinked: it lives on in no layer
    unlinked = os.open(d / "w", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(unlinked, b"w1\n")
    ok(ovf(who, "snapshot", "s0"))
    s0 = refs(who)["s0"]
    s0_print = fingerprint(layer_dir(who, s0))
    (d / "w").unlink()
    os.write(unlinked, b"w2\n")
    ok(ovf(who, "snapshot", "s1"))
    if how == "clean":       # clean returns to the current state: s1 plus what s2 adds
        (d / "s2-only").write_text("s2\n")
        ok(ovf(who, "snapshot", "s2"))
    (d / "a").write_text("v2\n")
    (d / "z").unlink()
    (mnt / "e").mkdir()
    identity = mount_identity(mnt)
    cwd = os.getcwd()
    os.chdir(d)
    fds: list[int] = [unlinked]
    try:
        assert not os.path.exists("z")       # the kernel caches this miss
        assert Path("a").read_text() == "v2\n"   # and a's pages
        reader = os.open("a", os.O_RDONLY)
        writer = os.open("a", os.O_WRONLY | os.O_APPEND)
        gone = os.open("b", os.O_RDWR | os.O_CREAT, 0o644)
        fds += [reader, writer, gone]
        os.write(gone, b"before\n")
        upper = refs(who)[cat.UPPER]
        frozen = all_fingerprints(who, but=upper)
        ok(ovf(who, how) if how == "clean" else ovf(who, "rollback", "s1"))
        now = refs(who)
        target = now["s1"] if how == "rollback" else now["s2"]
        assert now[cat.CURRENT] == target and now[cat.UPPER] not in (upper, target)
        assert not (who.base / "layers" / upper).exists()    # the old upper is gone
        want = ["a", "z"] if how == "rollback" else ["a", "s2-only", "z"]
        assert sorted(os.listdir(".")) == want            # the cwd shows the new state
        assert sorted(os.listdir(d)) == want
        assert not (mnt / "e").exists()
        assert Path("a").read_text() == "v1\n" and Path("z").read_text() == "z\n"
        assert os.pread(reader, 100, 0) == b"v1\n"        # as a new open sees it
        os.write(writer, b"more\n")                       # copied up, then appended
        assert (d / "a").read_text() == "v1\nmore\n"
        os.write(gone, b"after\n")                        # an unlinked file: its own data
        assert os.pread(gone, 100, 0) == b"before\nafter\n"
        assert not (d / "b").exists()
        Path("made").write_text("in cwd\n")
        assert (d / "made").read_text() == "in cwd\n"
        os.write(unlinked, b"w3\n")
        assert os.pread(unlinked, 100, 0) == b"w1\nw2\nw3\n"
        assert all_fingerprints(who, but=refs(who)[cat.UPPER]) == frozen
        assert fingerprint(layer_dir(who, s0)) == s0_print
        assert (layer_dir(who, s0) / "d" / "w").read_bytes() == b"w1\n"
        assert mount_identity(mnt) == identity
    finally:
        for fd in fds:
            os.close(fd)
        os.chdir(cwd)
    check_consistent(who)
    ok(ovf(who, "snapshot", "s3"))
    shown = ok(ovf(who, "run", "--snapshot", "s3", "--", "ls", "/d"))
    assert shown.split() == sorted(want + ["made"])


def test_kernel_mount_remounts_when_idle(tmp_path: Path) -> None:
    """The kernel backend cannot switch layers under a mount: a snapshot (and a rollback)
    unmounts, does it and mounts again at the same path when nothing holds the mount, and
    otherwise fails naming who holds it, with nothing changed."""
    who = Who(None, tmp_path)
    who.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(ovf(who, "mount", "--backend", "kernel", str(mnt)))
    try:
        (mnt / "f").write_text("one\n")
        ok(ovf(who, "snapshot", "s1"))
        assert mount_identity(mnt)           # mounted again (a new mount, as it must be)
        assert (layer_dir(who, refs(who)["s1"]) / "f").read_text() == "one\n"
        (mnt / "f").write_text("two\n")
        # runs work in the mounted tree, or on a throwaway upper over it
        ok(ovf(who, "run", "--", "sh", "-c", "echo run >> /f"))
        assert ok(ovf(who, "run", "--writable", "--", "sh", "-c", "echo x >> /f; cat /f")) \
            == "two\nrun\nx\n"
        assert (mnt / "f").read_text() == "two\nrun\n"
        holder = subprocess.Popen(["sleep", "600"], cwd=mnt)
        try:
            before = refs(who)
            r = ovf(who, "snapshot", "s2")
            assert r.returncode != 0
            assert f"pid {holder.pid} (sleep)" in r.stderr, r.stderr
            r = ovf(who, "rollback", "s1")
            assert r.returncode != 0 and f"pid {holder.pid} (sleep)" in r.stderr, r.stderr
            assert refs(who) == before and (mnt / "f").read_text() == "two\nrun\n"
        finally:
            holder.kill()
            holder.wait()
        ok(ovf(who, "rollback", "s1"))
        assert (mnt / "f").read_text() == "one\n"
        steps = who.home / "steps"
        steps.write_text("echo built > /built\n")
        r = subprocess.run([sys.executable, "-m", "overlayfuse", "build", "--base",
                            str(who.base), str(steps)], capture_output=True, text=True,
                           timeout=TIMEOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 0, r.stderr
        assert (mnt / "built").read_text() == "built\n"    # mounted again on the result
        fstype = [line.split(" - ")[1].split()[0] for line in
                  Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(mnt)]
        assert fstype == ["overlay"]
    finally:
        unmount(who, mnt)


RUN_STEP = ("echo one > /step1 && sleep 1 && echo two > /step2 && "
            "while [ ! -e /go-on ]; do sleep 0.05; done && cat /from-ide > /seen")


def test_run_and_build_beside_the_mount(mounted: tuple[Who, Path]) -> None:
    """``store run`` works in the mounted tree itself: its changes show in the mount as they
    happen, and it sees the IDE's; ``--snapshot`` runs on a snapshot; ``build`` runs its
    steps in their own layers and the mount switches to the result."""
    who, mnt = mounted
    (mnt / "from-ide").write_text("edited\n")
    run = subprocess.Popen([sys.executable, "-m", "overlayfuse", "store", "--base",
                            str(who.base), "run", "--", "sh", "-c", RUN_STEP],
                           env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=who.home,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (mnt / "step1").exists():     # the first step shows while the run goes on
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.02)
        assert (mnt / "step1").read_text() == "one\n" and not (mnt / "step2").exists()
        (mnt / "go-on").touch()
        out, err = run.communicate(timeout=TIMEOUT)
        assert run.returncode == 0, err
    finally:
        run.kill()
        run.wait()
    assert (mnt / "step2").read_text() == "two\n" and (mnt / "seen").read_text() == "edited\n"
    assert not (mnt / "proc").exists() and not (mnt / "dev").exists()  # the run's, taken out
    ok(ovf(who, "snapshot", "s1"))
    assert ok(ovf(who, "run", "--snapshot", "s1", "--", "cat", "/step2")) == "two\n"
    assert ok(ovf(who, "shell", input="cat /seen\n")) == "edited\n"
    r = ovf(who, "run", "--writable", "--", "sh", "-c", "echo x > /thrown && cat /step1")
    assert r.returncode == 0 and r.stdout == "one\n", r.stderr
    assert not (mnt / "thrown").exists()
    steps = who.home / "steps"
    steps.write_text("echo built > /built\n")
    r = subprocess.run([sys.executable, "-m", "overlayfuse", "build", "--base", str(who.base),
                        "--tag", "b1", str(steps)], capture_output=True, text=True,
                       timeout=TIMEOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert (mnt / "built").read_text() == "built\n"          # the mount shows the result
    assert refs(who)["b1"] == refs(who)[cat.CURRENT] != refs(who)[cat.UPPER]
