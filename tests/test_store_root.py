"""The store runs commands with the config's tree as ``/``: ``store run``, ``store shell`` and
every ``build`` step, on a small busybox tree imported with ``init --from``, as root and as the
normal user ``ovfuser``.  Nothing reaches the host but through ``--bind``; nothing a command
starts outlives it; bad input is one ``overlayfuse:`` line with the store unchanged."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import busybox_tree
from mounts import REPO, tree_snapshot
from unpriv import Unprivileged

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

APPLETS = ("sh", "ash", "ls", "cat", "pwd", "echo", "sleep", "ln", "readlink", "mkdir", "id",
           "touch", "test")
TIMEOUT = 120
# the host's programs shown read-only in a tree that has none (a data-only config): what the
# other store tests run their commands with, now that the tree is /
TOOL_BINDS = tuple(f"{d}:{d}:ro" for d in ("/usr", "/bin", "/lib", "/lib64") if os.path.exists(d))
HOST_TOOLS = tuple(a for b in TOOL_BINDS for a in ("--bind", b))
# what `ls /` shows beside a data-only tree's entries when run with HOST_TOOLS
SEEN_MOUNT_POINTS = ("proc", "dev", "sys", *(b.split(":")[0][1:] for b in TOOL_BINDS))


def make_tree(path: Path, shell: str | None = "/bin/ash") -> Path:
    """busybox and some applets, root's passwd entry (its shell: ``shell``), no /proc /dev /sys
    (the run makes those mount points and takes them out of the layers again)."""
    busybox_tree(path, APPLETS, shell=shell)
    (path / "TREE-MARKER").write_text("tree\n")
    return path


@dataclass
class Who:
    """Runs ``overlayfuse`` as root (``user`` None) or as the test user, in ``home``."""

    user: Unprivileged | None
    home: Path

    @property
    def base(self) -> Path:
        return self.home / "store"

    def ovf(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = dict(capture_output=True, text=True, timeout=TIMEOUT, input=input)
        if self.user is None:
            return subprocess.run([sys.executable, "-m", "overlayfuse", *args],
                                  env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=self.home, **kw)
        return self.user.run([self.user.python, "-m", "overlayfuse", *args], **kw)

    def store(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.ovf("store", "--base", str(self.base), *args, input=input)

    def own(self, path: Path) -> Path:
        if self.user is not None:
            subprocess.run(["chown", "-R", f"{self.user.uid}:{self.user.gid}", str(path)],
                           check=True)
        return path

    def init(self, shell: str | None = "/bin/ash") -> None:
        src = self.own(make_tree(self.home / f"src-{uuid.uuid4().hex[:6]}", shell))
        ok(self.store("init", "--from", str(src)))

    def build(self, steps: list[str], *args: str) -> subprocess.CompletedProcess[str]:
        f = self.home / "steps"
        f.write_text("".join(s + "\n" for s in steps))
        self.own(f)
        return self.ovf("build", "--base", str(self.base), *args, str(f))


@pytest.fixture(params=["root", "user"])
def who(request: pytest.FixtureRequest, tmp_path: Path) -> Who:
    if request.param == "root":
        return Who(None, tmp_path)
    u: Unprivileged = request.getfixturevalue("unprivileged")
    return Who(u, u.home)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def layer_entries(base: Path) -> set[str]:
    """Every path in every layer of the store (relative to its layer)."""
    out = set()
    for layer in (base / "layers").iterdir():
        for d, dirs, files in os.walk(layer):
            for name in dirs + files:
                out.add(os.path.relpath(os.path.join(d, name), layer))
    return out


def host_pids_with(marker: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.append(int(p))
            except OSError:
                pass
    return out


def test_run_sees_the_tree_as_root(who: Who) -> None:
    who.init()
    r = who.store("run", "--", "sh", "-c", "pwd; ls /; id -u")
    lines = ok(r).splitlines()
    assert lines[0] == "/"
    assert lines[1:-1] == ["TREE-MARKER", "bin", "dev", "etc", "proc", "root", "sys", "tmp"]
    assert lines[-1] == "0"  # root inside: the host's root, or the user mapped to 0
    # the mount points it needed are not left in any layer
    assert not {"proc", "dev", "sys"} & layer_entries(who.base)


def test_steps_and_runs_write_the_tree_never_the_host(who: Who) -> None:
    who.init()
    name = f"LEAK-{uuid.uuid4().hex}"
    places = [Path("/tmp") / name, Path("/etc") / name, Path("/root") / name]
    assert not any(p.exists() for p in places)
    r = who.build([f"echo step > /tmp/{name}; echo step > /etc/{name}; "
                   f"echo step > /root/{name}"])
    assert r.returncode == 0, r.stderr
    ok(who.store("run", "--", "sh", "-c", f"echo run >> /tmp/{name}"))
    assert not any(p.exists() for p in places)
    entries = layer_entries(who.base)
    assert {f"tmp/{name}", f"etc/{name}", f"root/{name}"} <= entries
    out = ok(who.store("run", "--", "cat", f"/tmp/{name}", f"/etc/{name}", f"/root/{name}"))
    assert out == "step\nrun\nstep\nstep\n"


def test_absolute_symlinks_hold_across_steps_and_runs(who: Who) -> None:
    who.init()
    r = who.build(["mkdir -p /opt/app && echo v1 > /opt/app/data && ln -s /opt/app/data /opt/l",
                   "cat /opt/l > /opt/copy && readlink /opt/l > /opt/target"])
    assert r.returncode == 0, r.stderr
    out = ok(who.store("run", "--cwd", "/opt", "--", "sh", "-c", "cat l copy target; pwd"))
    assert out == "v1\nv1\n/opt/app/data\n/opt\n"


def test_background_processes_die_with_the_step_and_the_run(who: Who) -> None:
    who.init()
    step_mark, run_mark = 3000 + os.getpid() % 1000, 5000 + os.getpid() % 1000
    r = who.build([f"sleep {step_mark} & echo started"])
    assert r.returncode == 0, r.stderr
    assert host_pids_with(f"sleep\0{step_mark}") == []
    r = who.store("run", "--", "sh", "-c", f"sleep {run_mark} & echo started")
    assert ok(r) == "started\n"
    assert host_pids_with(f"sleep\0{run_mark}") == []


def test_binds_read_only_and_writable(who: Who) -> None:
    who.init()
    ro, rw = who.home / "ro", who.home / "rw"
    for d in (ro, rw):
        d.mkdir()
        (d / "f").write_text(f"{d.name}\n")
        who.own(d)
    r = who.store("run", "--bind", f"{ro}:/src:ro", "--bind", f"{rw}:/deep/out", "--", "sh",
                  "-c", "cat /src/f /deep/out/f; echo new > /deep/out/g; echo no > /src/g")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert r.stdout == "ro\nrw\n"
    assert (rw / "g").read_text() == "new\n" and not (ro / "g").exists()
    # the bind targets were mount points only: none of them stays in a layer
    assert not {"src", "deep", "deep/out"} & layer_entries(who.base)


def test_network_none_has_only_loopback(who: Who) -> None:
    who.init()
    out = ok(who.store("run", "--network", "none", "--", "cat", "/proc/net/dev"))
    names = {line.split(":")[0].strip() for line in out.splitlines()[2:]}
    assert names == {"lo"}
    out = ok(who.store("run", "--", "cat", "/proc/net/dev"))
    assert {line.split(":")[0].strip() for line in out.splitlines()[2:]} != {"lo"}


def test_snapshot_is_read_only_unless_writable(who: Who) -> None:
    who.init()
    r = who.store("run", "--snapshot", "postinit", "--", "sh", "-c", "echo x > /new")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    ok(who.store("run", "--snapshot", "postinit", "--writable", "--", "sh", "-c",
                 "echo x > /new"))
    assert "new" not in layer_entries(who.base)


@pytest.mark.parametrize("case", ["bind-source", "cwd", "not-found", "no-shell"])
def test_bad_input_one_line_nothing_changed(who: Who, case: str) -> None:
    who.init(shell=None if case == "no-shell" else "/bin/ash")
    if case == "no-shell":
        os.unlink(next((who.base / "layers").iterdir()) / "bin/sh")
    before = tree_snapshot(who.base / "layers")
    args, status, text = {
        "bind-source": (["run", "--bind", str(who.home / "missing"), "--", "true"], 125,
                        "no such file or directory"),
        "cwd": (["run", "--cwd", "/no/such", "--", "true"], 125, "no such directory"),
        "not-found": (["run", "--", "no-such-command"], 127, "cannot run no-such-command"),
        "no-shell": (["shell"], 127, "no shell to run in the tree: /bin/sh"),
    }[case]
    r = who.store(*args, input="")
    assert r.returncode == status, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("overlayfuse: ")
    assert text in r.stderr
    after = tree_snapshot(who.base / "layers")
    assert {k: v for k, v in after.items() if k in before} == before
    # only the config's next upper may have been allocated (lazily, as any run does): empty
    new = set(after) - set(before)
    assert all("/" not in k and after[k][0] == "d" for k in new), new
    assert len(new) <= (0 if case == "bind-source" else 1)
    assert os.listdir(who.base / "tmp") == []


def test_shell_on_stdin_runs_roots_shell_in_the_tree(who: Who) -> None:
    who.init()
    r = who.store("shell", input="echo $0; pwd; cat /TREE-MARKER; echo hi > /root/h; exit 3\n")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "/bin/ash\n/\ntree\n"
    assert "root/h" in layer_entries(who.base)


def test_shell_on_a_terminal_prompts(who: Who) -> None:
    who.init()
    primary, secondary = pty.openpty()
    argv = ["-m", "overlayfuse", "store", "--base", str(who.base), "shell"]
    kw: dict[str, Any] = dict(stdin=secondary, stdout=secondary, stderr=secondary,
                              start_new_session=True)
    if who.user is None:
        proc = subprocess.Popen([sys.executable, *argv], cwd=who.home,
                                env=dict(os.environ, PYTHONPATH=str(REPO), TERM="dumb"), **kw)
    else:
        proc = who.user.popen([who.user.python, *argv], env={"TERM": "dumb"}, **kw)
    os.close(secondary)
    seen = b""
    try:
        seen += read_until(primary, b"# ")          # ash's prompt for root: "/ # "
        os.write(primary, b"echo got-$((40+2))\n")
        seen += read_until(primary, b"got-42")
        os.write(primary, b"exit 4\n")
        assert proc.wait(timeout=TIMEOUT) == 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    assert b"/ # " in seen


def read_until(fd: int, want: bytes) -> bytes:
    got, deadline = b"", time.monotonic() + 30
    while want not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} on the terminal: {got!r}"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 4096)
    return got
