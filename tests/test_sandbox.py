"""The sandbox: a command with a busybox tree as ``/`` in namespaces of its own, as root and as a
normal user (with and without subordinate IDs), and nothing of it left afterwards.

Every run goes through a small runner script in a fresh interpreter (as root, or as the test
user through setpriv), so the command's output, status and leftovers are seen from outside.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import busybox_tree
from mounts import REPO, tree_snapshot
from unpriv import Unprivileged, subordinate_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")

APPLETS = ("sh", "ls", "cat", "id", "ps", "sleep", "touch", "mknod", "mkfifo", "chown", "stat",
           "echo", "head", "wc", "pwd", "grep", "kill", "test", "[", "true")
DEV_ENTRIES = {"null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout",
               "stderr", "ptmx", "pts", "shm"}
SUB_START, SUB_COUNT = 700000, 65536
TIMEOUT = 30

RUNNER = r"""
import json, sys
from overlayfuse.errors import OverlayfuseError
from overlayfuse.sandbox import Bind, CommandError, Sandbox, run
from overlayfuse.sysmount.syscalls import MS_BIND, MS_REC, mount
a = json.loads(sys.argv[1])
prepare = None
if a["prepare_bind"]:
    def prepare():
        mount(a["prepare_bind"], a["root"], None, MS_BIND | MS_REC)
try:
    sb = Sandbox(a["root"], binds=tuple(Bind.parse(b) for b in a["binds"]),
                 network=a["network"], cwd=a["cwd"], idmap=a["idmap"], prepare=prepare)
    if a["describe"]:
        print("note:", sb.describe(), file=sys.stderr)
    status = run(sb, a["argv"])
except CommandError as e:
    print(f"overlayfuse: {e}", file=sys.stderr)
    status = e.status
except OverlayfuseError as e:
    print(f"overlayfuse: {e}", file=sys.stderr)
    status = 125
sys.exit(status)
"""


def make_tree(path: Path) -> Path:
    """A tiny root: busybox and its applets, its own resolv.conf and hosts, the usual dirs."""
    busybox_tree(path, APPLETS, dirs=("bin", "etc", "proc", "dev", "sys", "tmp", "root"),
                 shell=None)
    (path / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    (path / "etc/hosts").write_text("192.0.2.2 the-tree\n")
    (path / "TREE-MARKER").write_text("tree\n")
    return path


def cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pids_with(marker: str) -> list[int]:
    """Host PIDs whose command line holds ``marker``."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and marker.encode() in cmdline(p) and int(p) != os.getpid()]


def start_time(pid: int) -> str | None:
    """The process's start time (stat field 22): tells a PID's reuse from the process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"the runner ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@dataclass
class Box:
    """Runs the sandbox runner as root (``user`` None) or as the test user, on ``tree``."""

    user: Unprivileged | None
    base: Path
    tree: Path

    @property
    def who(self) -> str:
        return "root" if self.user is None else "user"

    def _argv(self, argv: Sequence[str], binds: Sequence[str], network: str, cwd: str,
              idmap: str, describe: bool, root: Path | None, prepare_bind: Path | None
              ) -> list[str]:
        args = {"root": str(root or self.tree), "argv": list(argv), "binds": list(binds),
                "network": network, "cwd": cwd, "idmap": idmap, "describe": describe,
                "prepare_bind": str(prepare_bind) if prepare_bind else None}
        python = sys.executable if self.user is None else self.user.python
        return [python, "-c", RUNNER, json.dumps(args)]

    def _kw(self) -> dict[str, Any]:
        if self.user is None:
            return {"env": {**os.environ, "PYTHONPATH": str(REPO)}, "cwd": str(self.base)}
        return {}

    def run(self, argv: Sequence[str], *, binds: Sequence[str] = (), network: str = "host",
            cwd: str = "/", idmap: str = "auto", describe: bool = False,
            root: Path | None = None, prepare_bind: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run the runner to its end; none of its processes may be left."""
        full = self._argv(argv, binds, network, cwd, idmap, describe, root, prepare_bind)
        with self._started(full) as proc:
            out, err = proc.communicate(timeout=TIMEOUT)
            self.assert_nothing_left()
        return subprocess.CompletedProcess(full, proc.returncode, out, err)

    @contextlib.contextmanager
    def popen(self, argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
        """The runner, started for the block (see ``_started``)."""
        with self._started(self._argv(argv, (), "host", "/", "auto", False, None, None)) as p:
            yield p

    @contextlib.contextmanager
    def _started(self, full: list[str]) -> Iterator[subprocess.Popen[str]]:
        """The runner in a session of its own (no terminal: every signal is forwarded).  The
        session is killed afterwards, whatever a broken sandbox left running in it: check for
        leftovers inside the block."""
        opts: dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        proc = (subprocess.Popen(full, **opts, **self._kw()) if self.user is None
                else self.user.popen_as_user(full, **opts))
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()

    def assert_nothing_left(self) -> None:
        """No relay or init of a run (they carry the tree's path in their command line)."""
        assert pids_with(str(self.tree)) == [], "a sandbox process outlived its run"


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


@pytest.fixture(params=["root", "user"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Box:
    """A fresh tree, run on as root and as the unprivileged user (the tree is then its own)."""
    if request.param == "root":
        return Box(None, tmp_path, make_tree(tmp_path / "tree"))
    u: Unprivileged = request.getfixturevalue("unprivileged")
    tree = make_tree(u.home / "tree")
    subprocess.run(["chown", "-R", f"{u.uid}:{u.gid}", str(tree)], check=True)
    return Box(u, u.home, tree)


@pytest.fixture
def user_box(unprivileged: Unprivileged) -> Box:
    tree = make_tree(unprivileged.home / "tree")
    subprocess.run(["chown", "-R", f"{unprivileged.uid}:{unprivileged.gid}", str(tree)],
                   check=True)
    return Box(unprivileged, unprivileged.home, tree)


@pytest.fixture
def subids(unprivileged: Unprivileged) -> Iterator[int]:
    with subordinate_ids(unprivileged.user, SUB_START, SUB_COUNT):
        yield SUB_START


# -- the tree is / ---------------------------------------------------------------------------

def test_root_is_the_tree(box: Box) -> None:
    before = set(os.listdir(box.tree))
    r = box.run(sh("pwd; ls -A /; echo x > /tmp/written; cat /TREE-MARKER"))
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    assert out[0] == "/"
    assert set(out[1:-1]) == before  # the host's bin, usr, work... do not show
    assert out[-1] == "tree"
    assert (box.tree / "tmp/written").read_text() == "x\n"
    assert not Path("/tmp/written").exists()


def test_host_root_unreachable(box: Box) -> None:
    """pivot_root, not chroot: the host's root is gone from the namespace, so the classic
    escape (a chroot further in, then ``..`` from a handle on the old ``/``) stays in the
    tree; after a bare chroot it would list the tree's parent on the host."""
    r = box.run(sh("exec 3< /; mkdir -p /tmp/e/proc; busybox mount -t proc proc /tmp/e/proc; "
                   "busybox ln /bin/busybox /tmp/e/busybox; "
                   "busybox chroot /tmp/e /busybox ls -A /proc/self/fd/3/.."))
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == set(os.listdir(box.tree))


def test_cwd_in_the_tree(box: Box) -> None:
    r = box.run(["pwd"], cwd="/etc")
    assert (r.returncode, r.stdout) == (0, "/etc\n"), r.stderr
    src = box.base / "src"
    (src / "sub").mkdir(parents=True)
    if box.user is not None:
        box.user.chown(src, src / "sub")
    r = box.run(sh("pwd; ls"), cwd="/src", binds=[f"{src}:/src"])  # a dir the bind makes
    assert (r.returncode, r.stdout) == (0, "/src\nsub\n"), r.stderr


def test_proc_shows_only_the_sandbox(box: Box) -> None:
    r = box.run(sh("echo $$; ls /proc; echo --; cat /proc/1/cmdline"))
    assert r.returncode == 0, r.stderr
    listing, init = r.stdout.split("--\n", 1)
    me, *names = listing.split()
    assert me == "2"  # the command; PID 1 is our init, PID 3 the ls
    assert sorted(int(p) for p in names if p.isdigit()) == [1, 2, 3]
    assert "python" in init and "from overlayfuse.sandbox import" in init


def test_dev_has_the_listed_nodes_and_they_work(box: Box) -> None:
    r = box.run(sh("ls -A /dev; echo --; ls -A /dev/pts; echo hi > /dev/null; "
                   "head -c 4 /dev/urandom | wc -c; head -c 5 /dev/zero | wc -c; "
                   "head -c 3 /dev/random | wc -c; (echo x > /dev/full) 2>&1; "
                   "touch /dev/shm/s && echo shm ok"))
    assert r.returncode == 0, r.stderr
    dev, rest = r.stdout.split("--\n")
    assert set(dev.split()) == DEV_ENTRIES
    lines = [line.strip() for line in rest.splitlines()]
    assert lines[0] == "ptmx"
    assert lines[1:4] == ["4", "5", "3"]
    assert "No space left on device" in lines[4]
    assert lines[5] == "shm ok"


@pytest.mark.parametrize("network", ["host", "none"])
def test_sys_is_read_only(box: Box, network: str) -> None:
    r = box.run(sh("(touch /sys/x) 2>&1; grep -E ' /sys( |/)' /proc/self/mountinfo"),
                network=network)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Read-only file system" in lines[0]
    mounts = [line.split() for line in lines[1:]]
    assert mounts and all(m[5].split(",")[0] == "ro" for m in mounts), lines
    if box.user is not None and network == "host":
        # no sysfs of our own here: the host's /sys bound in, every mount below it read-only
        host = [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
                if m.split()[4] == "/sys" or m.split()[4].startswith("/sys/")]
        assert len(mounts) == len(host)


def test_host_files_shown_neither_changed(box: Box) -> None:
    hosts, resolv = Path("/etc/hosts").read_bytes(), Path("/etc/resolv.conf").read_bytes()
    before = tree_snapshot(box.tree, owner=True)
    r = box.run(sh("cat /etc/resolv.conf; echo --; cat /etc/hosts; echo --; "
                   "echo 203.0.113.9 added >> /etc/hosts; echo nameserver 0.0.0.0 "
                   ">> /etc/resolv.conf; grep -c added /etc/hosts"))
    assert r.returncode == 0, r.stderr
    shown_resolv, shown_hosts, count = r.stdout.split("--\n")
    assert (shown_resolv.encode(), shown_hosts.encode(), count) == (resolv, hosts, "1\n")
    assert Path("/etc/hosts").read_bytes() == hosts
    assert Path("/etc/resolv.conf").read_bytes() == resolv
    assert tree_snapshot(box.tree, owner=True) == before


def test_binds_rw_ro_and_file(box: Box) -> None:
    rw, ro, f = box.base / "rw", box.base / "ro", box.base / "file.txt"
    rw.mkdir()
    ro.mkdir()
    (rw / "in").write_text("rw-in\n")
    (ro / "in").write_text("ro-in\n")
    f.write_text("a file\n")
    if box.user is not None:
        box.user.chown(rw, ro, rw / "in", ro / "in", f)
    r = box.run(sh("cat /mnt/rw/in; echo new > /mnt/rw/out; cat /mnt/ro/in; "
                   "(echo x > /mnt/ro/out) 2>&1; cat /etc/fbind"),
                binds=[f"{rw}:/mnt/rw", f"{ro}:/mnt/ro:ro", f"{f}:/etc/fbind"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "rw-in" and lines[1] == "ro-in"
    assert "Read-only file system" in lines[2]
    assert lines[3] == "a file"
    assert (rw / "out").read_text() == "new\n"
    assert not (ro / "out").exists()
    # the missing targets were made, empty, in the tree (documented)
    assert os.listdir(box.tree / "mnt/rw") == [] and os.listdir(box.tree / "mnt/ro") == []
    assert (box.tree / "etc/fbind").read_text() == ""


def interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:]}


def test_network_none_has_loopback_up(box: Box) -> None:
    r = box.run(sh("cat /proc/net/dev; echo --; ls /sys/class/net; cat /sys/class/net/lo/flags"),
                network="none")
    assert r.returncode == 0, r.stderr
    dev, rest = r.stdout.split("--\n")
    assert interfaces(dev) == {"lo"}
    names, flags = rest.split()
    assert names == "lo" and int(flags, 16) & 0x1  # IFF_UP


def test_network_host_is_the_hosts(box: Box) -> None:
    r = box.run(["cat", "/proc/net/dev"])
    assert r.returncode == 0, r.stderr
    assert interfaces(r.stdout) == interfaces(Path("/proc/net/dev").read_text())
    assert interfaces(r.stdout) != {"lo"}


def test_exit_status(box: Box) -> None:
    assert box.run(sh("exit 3")).returncode == 3
    assert box.run(sh("kill -KILL $$")).returncode == 128 + signal.SIGKILL


# -- nothing left, signals ---------------------------------------------------------------------

def test_background_process_gone_when_command_ends(box: Box) -> None:
    tag = uuid.uuid4().hex
    marker = f"bg-{tag}"  # written split below: only the background sh's argv holds it whole
    tmp = box.tree / "tmp"
    with box.popen(sh(f"sh -c 'sleep 1000; :' bg-''{tag} >/dev/null 2>&1 & "
                      "echo $! > /tmp/bg.pid; touch /tmp/ready; "
                      "while [ ! -e /tmp/go ]; do sleep 0.01; done")) as proc:
        wait_for(tmp / "ready", proc)
        bg, sleeper = background_pair(marker)
        inner = Path(f"/proc/{bg}/status").read_text().split("NSpid:")[1].split("\n")[0]
        assert inner.split()[-1] == (tmp / "bg.pid").read_text().strip()
        left = {p: start_time(p) for p in (bg, sleeper)}
        (tmp / "go").touch()
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert pids_with(marker) == []
        assert all(start_time(p) != t for p, t in left.items())
        box.assert_nothing_left()


def test_killed_caller_leaves_nothing(box: Box) -> None:
    """SIGKILL to the caller (no forwarding possible): the relay dies with it, the namespace
    with the relay."""
    tag = uuid.uuid4().hex
    with box.popen(sh(f"sh -c 'sleep 1000; :' bg-''{tag} & touch /tmp/ready; "
                      "exec sleep 1000")) as proc:
        wait_for(box.tree / "tmp/ready", proc)
        background_pair(f"bg-{tag}")
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + TIMEOUT
        while (pids_with(f"bg-{tag}") or pids_with(str(box.tree))) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert pids_with(f"bg-{tag}") == [] and pids_with(str(box.tree)) == []


def background_pair(marker: str) -> tuple[int, int]:
    """The background sh holding ``marker`` and its sleep, once the sleep has exec'd (until
    then the forked child still shows the sh's command line)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = pids_with(marker)
        if len(found) == 1:
            kids = Path(f"/proc/{found[0]}/task/{found[0]}/children").read_text().split()
            if len(kids) == 1 and cmdline(kids[0]).startswith(b"sleep\0"):
                return found[0], int(kids[0])
        time.sleep(0.01)
    raise AssertionError(f"no settled background process with {marker}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 71), (signal.SIGTERM, 72),
                                       (signal.SIGHUP, 73)])
def test_signals_reach_the_command(box: Box, sig: signal.Signals, code: int) -> None:
    with box.popen(sh("trap 'exit 71' INT; trap 'exit 72' TERM; trap 'exit 73' HUP; "
                      "touch /tmp/ready; while :; do sleep 0.01; done")) as proc:
        wait_for(box.tree / "tmp/ready", proc)
        proc.send_signal(sig)
        proc.communicate(timeout=TIMEOUT)
        box.assert_nothing_left()
    assert proc.returncode == code


def test_untrapped_signal_is_the_status(box: Box) -> None:
    with box.popen(sh("touch /tmp/ready; exec sleep 1000")) as proc:
        wait_for(box.tree / "tmp/ready", proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
        box.assert_nothing_left()
    assert proc.returncode == 128 + signal.SIGTERM


# -- prepare ------------------------------------------------------------------------------------

def test_prepare_mounts_the_root_inside(box: Box) -> None:
    """The root is only a tree after ``prepare`` ran in the namespaces; nothing of it shows
    outside, before or after."""
    empty = box.base / "empty-root"
    empty.mkdir()
    if box.user is not None:
        box.user.chown(empty)
    r = box.run(["cat", "/TREE-MARKER"], root=empty, prepare_bind=box.tree)
    assert (r.returncode, r.stdout) == (0, "tree\n"), r.stderr
    assert os.listdir(empty) == []


def test_python_api_in_process(tmp_path: Path) -> None:
    """The API as the store will call it: ``prepare`` a callable, CommandError for 127."""
    from overlayfuse.sandbox import CommandError, Sandbox, run
    from overlayfuse.sysmount.syscalls import MS_BIND, MS_REC, mount
    tree = make_tree(tmp_path / "tree")
    root = tmp_path / "root"
    root.mkdir()
    sb = Sandbox(str(root), prepare=lambda: mount(str(tree), str(root), None, MS_BIND | MS_REC))
    assert "no user namespace" in sb.describe()
    assert run(sb, sh("test -e /TREE-MARKER && exit 4")) == 4
    with pytest.raises(CommandError) as e:
        run(sb, ["no-such-command"])
    assert e.value.status == 127
    assert os.listdir(root) == []


# -- IDs as a normal user -----------------------------------------------------------------------

def test_subordinate_ids_mapped(user_box: Box, subids: int) -> None:
    u, tmp = user_box.user, user_box.tree / "tmp"
    assert u is not None
    r = user_box.run(sh("id -u; id -g; cat /proc/self/uid_map; touch /tmp/a /tmp/b /tmp/own; "
                        "chown 1:1 /tmp/a; chown 1000:1000 /tmp/b; mkfifo /tmp/p; "
                        "(mknod /tmp/c c 1 3) 2>&1; echo end"), describe=True)
    assert r.returncode == 0, r.stderr
    assert f"{SUB_START}-{SUB_START + SUB_COUNT - 1} (/etc/subuid)" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["0", "0"]
    assert [line.split() for line in lines[2:4]] == [["0", str(u.uid), "1"],
                                                      ["1", str(subids), str(SUB_COUNT)]]
    assert "Operation not permitted" in lines[4] and lines[5] == "end"
    owner = {n: (os.lstat(tmp / n).st_uid, os.lstat(tmp / n).st_gid) for n in os.listdir(tmp)}
    # inside ID N (N >= 1) is the N-th subordinate ID: subids + N - 1
    assert owner == {"a": (subids, subids), "b": (subids + 999, subids + 999),
                     "own": (u.uid, u.gid), "p": (u.uid, u.gid)}
    assert stat.S_ISFIFO(os.lstat(tmp / "p").st_mode)


def test_one_id_fallback_says_why(user_box: Box, no_subids: None) -> None:
    u = user_box.user
    assert u is not None
    r = user_box.run(sh("id -u; cat /proc/self/uid_map; touch /tmp/a; "
                        "(chown 1:1 /tmp/a) 2>&1; true"), describe=True)
    assert r.returncode == 0, r.stderr
    note = r.stderr.strip()
    assert note.startswith("note: user namespace with one ID")
    assert f"no range for {u.user} in /etc/subuid" in note
    assert "usermod --add-subuids" in note and note.endswith(u.user)
    lines = r.stdout.splitlines()
    assert lines[0] == "0" and lines[1].split() == ["0", str(u.uid), "1"]
    assert "Invalid argument" in lines[2]
    st = os.lstat(user_box.tree / "tmp/a")
    assert (st.st_uid, st.st_gid) == (u.uid, u.gid)


REMOUNT = """
import json, os, sys
from overlayfuse import sysmount as s
from overlayfuse.sandbox.rootfs import remount_readonly
src, target = sys.argv[1:3]
uid, gid = os.geteuid(), os.getegid()
s.unshare(s.CLONE_NEWNS | (s.CLONE_NEWUSER if uid else 0))
if uid:
    s.map_ids(0, uid, 0, gid)
s.make_rprivate()
s.mount(src, target, None, s.MS_REC | 4096)
flags = lambda: [os.statvfs(m).f_flag for m in s.mounts_under(target)]
before = flags()
remount_readonly(target)
print(json.dumps([before, flags()]))
"""


def test_remount_readonly_for_old_kernels(box: Box) -> None:
    """The fallback of make_readonly (kernels before mount_setattr): a bind of a host tree of
    two mounts becomes read-only throughout, each keeping its other flags (the ones a user
    namespace locks: dropping them is EPERM there)."""
    src, target = box.base / "src", box.base / "target"
    src.mkdir()
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec,mode=755", "ro-src",
                    str(src)], check=True)
    try:
        (src / "sub").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,noatime", "ro-sub",
                        str(src / "sub")], check=True)
        if box.user is not None:
            box.user.chown(src, target)
        argv = [sys.executable if box.user is None else box.user.python, "-c", REMOUNT,
                str(src), str(target)]
        if box.user is None:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                               **box._kw())
        else:
            r = box.user.run_as_user(argv, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        for m in (src / "sub", src):
            subprocess.run(["umount", str(m)], capture_output=True)
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout)
    assert len(before) == 2 and all(f & os.ST_NOSUID and not f & os.ST_RDONLY for f in before)
    assert after == [f | os.ST_RDONLY for f in before]


# -- bad input ------------------------------------------------------------------------------------

# (sandbox arguments, status, message, refused before anything is made)
BAD = {
    "bind source": ({"binds": ["/no/such/dir:/mnt"]}, 125, "--bind /no/such/dir: no such file",
                    True),
    "bind target outside": ({"binds": ["/etc:/../etc2"]}, 125, "is outside the tree", True),
    "cwd missing": ({"cwd": "/nope"}, 125, "working directory /nope: no such directory", True),
    "cwd outside": ({"cwd": "../x"}, 125, "working directory ../x is outside the tree", True),
    "not found": ({"argv": ["no-such-command"]}, 127, "cannot run no-such-command: No such",
                  False),
    "not executable": ({"argv": ["/etc/hosts"]}, 126, "cannot run /etc/hosts: Permission",
                       False),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nothing_changed(box: Box, case: str) -> None:
    """One line, our status, and the tree as it was.  Where the refusal comes before the root
    is set up, the tree lacks /sys: a mount point made too early would show."""
    given, status, text, early = BAD[case]
    kw = dict(given)
    argv = kw.pop("argv", ["true"])
    if early:
        (box.tree / "sys").rmdir()
    before = tree_snapshot(box.tree, owner=True)
    r = box.run(argv, **kw)
    assert r.returncode == status
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("overlayfuse: "), r.stderr
    assert text in r.stderr
    assert tree_snapshot(box.tree, owner=True) == before


def test_subids_asked_without_ranges(user_box: Box, no_subids: None) -> None:
    r = user_box.run(["true"], idmap="subids")
    assert r.returncode == 125
    assert r.stderr.startswith("overlayfuse: no subordinate IDs to map: no range for ")
    assert len(r.stderr.splitlines()) == 1
