"""``overlayfuse store`` as a user types it: round trips as root and as a normal user, the
errors (one line, nothing changed), and one config seen through every backend."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, ovf
from test_store_root import HOST_TOOLS, SEEN_MOUNT_POINTS, TOOL_BINDS
from mounts import diff_trees, mounts_under, tree_snapshot
from overlayfuse import LayerStore
from overlayfuse.errors import OverlayfuseError

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]


def make_src(root: Path) -> Path:
    src = root / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/conf").write_text("v1\n")
    (src / "dir/sub").mkdir(parents=True)
    (src / "dir/sub/deep").write_text("deep")
    (src / "hello").write_text("hello\n")
    os.link(src / "hello", src / "hello-link")
    os.symlink("hello", src / "sym")
    os.setxattr(src / "hello", "user.tag", b"kept")
    return src


def store(base: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return ovf("store", "--base", str(base), *args, **kw)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: "), r.stderr
    assert words in lines[0], lines[0]


def disk_state(base: Path) -> tuple[Any, ...]:
    s = LayerStore(str(base))
    conn = s.db()
    return (sorted(conn.execute("SELECT config, name, layer FROM refs")),
            sorted(os.listdir(base / "layers")))


def test_round_trip_as_root(tmp_path: Path) -> None:
    src = make_src(tmp_path)
    base, mnt, mnt2 = tmp_path / "store", tmp_path / "mnt", tmp_path / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    ok(store(base, "init", "--from", str(src)))
    assert ok(store(base, "snapshots")) == "* postinit\n"
    ok(store(base, "mount", str(mnt)))
    try:
        assert (mnt / "hello").read_text() == "hello\n"
        assert os.getxattr(mnt / "hello", "user.tag") == b"kept"
        (mnt / "etc/conf").write_text("v2\n")
        os.unlink(mnt / "hello-link")
        before = disk_state(base)
        # a kernel mount cannot switch layers: a snapshot remounts it, unless in use
        held = os.open(mnt / "hello", os.O_RDONLY)
        try:
            holder = f"in use by pid {os.getpid()}"
            one_line_error(store(base, "snapshot", "s1"), holder)
            one_line_error(store(base, "rollback", "postinit"), holder)
        finally:
            os.close(held)
        one_line_error(store(base, "mount", str(mnt2)), f"mounted writable at {mnt}")
        assert disk_state(base) == before
    finally:
        ok(store(base, "umount", str(mnt)))
    assert mounts_under(tmp_path) == []
    ok(store(base, "snapshot", "s1"))
    assert ok(store(base, "snapshots")) == "  postinit\n* s1\n"
    ok(store(base, "snapshot", "s2"))               # nothing in between: one layer, two names
    assert ok(store(base, "snapshots")) == "  postinit\n* s1\n* s2\n"
    assert ok(store(base, "run", *HOST_TOOLS, "--", "cat", "etc/conf")) == "v2\n"
    # several throwaway runs at once; none of them changes the config
    procs = [subprocess.Popen([sys.executable, "-m", "overlayfuse", "store", "--base", str(base),
                               "run", "--writable", *HOST_TOOLS, "--", "sh", "-c",
                               f"echo {i} > etc/conf; sleep 0.5; cat etc/conf"],
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
             for i in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert outs == ["0\n", "1\n", "2\n"]
    assert ok(store(base, "run", *HOST_TOOLS, "--", "cat", "etc/conf")) == "v2\n"
    ok(store(base, "run", *HOST_TOOLS, "--", "sh", "-c", "echo unsaved > new"))
    ok(store(base, "clean"))
    # the tree is /: the bind targets (bin lib lib64 usr) and proc dev sys show as its mount
    # points, made for the run and taken out of the layer again
    assert ok(store(base, "run", *HOST_TOOLS, "--", "ls")).split() == sorted(
        ["dir", "etc", "hello", "sym", *SEEN_MOUNT_POINTS])
    ok(store(base, "rollback", "postinit"))
    assert ok(store(base, "run", *HOST_TOOLS, "--", "cat", "etc/conf")) == "v1\n"
    assert ok(store(base, "snapshots")) == "* postinit\n  s1\n  s2\n"
    info = ok(store(base, "info"))
    # the run above allocated a fresh upper on postinit's layer (a run may write)
    assert "held by default:.base, default:.current, default:postinit, child" in info
    assert "held by default:.upper\n" in info
    assert "mount:" in info and "backend kernel" in info
    ok(store(base, "remove-snapshot", "s1"))
    ok(store(base, "remove-snapshot", "postinit"))  # the current one: the config still works
    assert ok(store(base, "snapshots")) == "  s2\n"
    assert ok(store(base, "run", *HOST_TOOLS, "--", "cat", "hello")) == "hello\n"
    ok(store(base, "--config", "other", "init", "--from-config", "default:s2"))
    assert ok(store(base, "--config", "other", "run", *HOST_TOOLS, "--", "cat",
                    "etc/conf")) == "v2\n"
    configs = ok(store(base, "configs")).splitlines()
    assert [c.split("\t")[:2] for c in configs] == [["default", "current: -"],
                                                    ["other", "current: postinit"]]
    n_before = len(os.listdir(base / "layers"))
    ok(store(base, "scrub"))                        # default goes; its s2 layer is other's base
    assert len(os.listdir(base / "layers")) == n_before - 1
    assert ok(store(base, "--config", "other", "run", *HOST_TOOLS, "--", "cat",
                    "etc/conf")) == "v2\n"
    ok(store(base, "--config", "other", "scrub"))
    assert os.listdir(base / "layers") == [] and os.listdir(base / "tmp") == []
    assert ok(store(base, "configs")) == ""
    assert ok(store(base, "gc")).startswith("gc: 0 layers kept")


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    base = tmp_path / "store"
    one_line_error(store(base, "snapshots"), "no store at")
    ok(store(base, "init"))
    ok(store(base, "snapshot", "a"))
    before = disk_state(base)
    for args, words in [
            (("snapshot", ".hidden"), "invalid snapshot name"),
            (("snapshot", "a/b"), "invalid snapshot name"),
            (("snapshot", "a"), "snapshot 'a' exists already"),
            (("rollback", "nope"), "no snapshot 'nope'"),
            (("remove-snapshot", "nope"), "no snapshot 'nope'"),
            (("init",), "config 'default' exists already"),
            (("--config", "bad name", "init"), "invalid config name"),
            (("--config", "x", "init", "--from-config", "nope"), "no config 'nope'"),
            (("--config", "x", "init", "--from-config", "default:nope"), "no snapshot 'nope'"),
            (("--config", "x", "init", "--from", str(tmp_path / "missing")), "not a directory"),
            (("--config", "nope", "snapshot", "z"), "no config 'nope'"),
            (("umount", str(tmp_path)), "is not a mount of the store")]:
        one_line_error(store(base, *args), words)
        assert disk_state(base) == before, args
    r = store(base, "run", *HOST_TOOLS, "--", "no-such-command-here")
    assert r.returncode == 127


def test_a_chain_longer_than_an_overlay_stacks_is_refused(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from overlayfuse.store import use
    monkeypatch.setattr(use, "MAX_LOWERS", 3)
    c = LayerStore(str(tmp_path / "store")).config("c")
    c.init()
    for i in range(2):
        assert c.run(["sh", "-c", f"echo {i} > f{i}"], binds=TOOL_BINDS) == 0
        c.snapshot(f"s{i}")
    assert c.run(["true"], writable=True, binds=TOOL_BINDS) == 0       # three layers: still fine
    assert c.run(["sh", "-c", "echo 2 > f2"], binds=TOOL_BINDS) == 0
    c.snapshot("s2")
    before = disk_state(tmp_path / "store")
    for call in (lambda: c.run(["true"]), lambda: c.run(["true"], writable=True),
                 lambda: c.mount(str(tmp_path))):
        with pytest.raises(OverlayfuseError, match="stacks 4 layers, more than the 3"):
            call()
        assert disk_state(tmp_path / "store") == before


CHANGES = r"""
set -e
mv dir dir-renamed
echo more >> hello
ln hello hello-2
rm sym
mkdir -p etc/new && echo n > etc/new/file
"""


def test_one_config_shows_the_same_tree_on_every_backend(tmp_path: Path) -> None:
    src = make_src(tmp_path)
    c = LayerStore(str(tmp_path / "store")).config("c")
    c.init(from_dir=str(src))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with c.mount(str(mnt), "kernel") as m:
        assert m.backend == "kernel"
        subprocess.run(["sh", "-c", CHANGES], cwd=mnt, check=True)
        on_kernel = tree_snapshot(mnt)
    with c.mount(str(mnt), "fuse") as m:
        assert m.backend == "fuse"
        assert diff_trees(on_kernel, tree_snapshot(mnt)) == []
        assert os.stat(mnt / "hello").st_ino == os.stat(mnt / "hello-2").st_ino
        subprocess.run(["sh", "-c", "mv dir-renamed dir-again; ln etc/conf etc/conf-2; "
                                    "echo v3 > etc/conf"], cwd=mnt, check=True)
        on_fuse = tree_snapshot(mnt)
    c.snapshot("both")
    for backend in ("kernel", "fuse"):
        with c.mount(str(mnt), backend):
            assert diff_trees(on_fuse, tree_snapshot(mnt)) == [], backend
            assert (mnt / "etc/conf-2").read_text() == "v3\n"
    # and through `run` (the tree as /), on each backend that reads root's layers
    # (trusted.overlay.*): the kernel and FUSE (its daemon inside the sandbox);
    # kernel-userns reads only user.overlay.*, so it refuses, saying why
    dump = ["/usr/bin/python3", "-c",
            "import os, sys; sys.path[:0] = ['/repo', '/repo/tests']; import mounts; "
            "real = os.listdir; mounts.os.listdir = lambda p: [n for n in real(p) if not "
            "(p == '.' and os.path.ismount(n))]; "
            "print(repr(sorted(mounts.tree_snapshot('.').items())))"]
    for backend in ("kernel", "kernel-userns", "fuse"):
        r = ovf("store", "--base", str(tmp_path / "store"), "--config", "c", "run",
                "--backend", backend, *HOST_TOOLS, "--bind", f"{REPO}:/repo:ro", "--", *dump)
        if backend == "kernel-userns":
            assert r.returncode == 125 and "would show another tree" in r.stderr, r.stderr
        else:
            assert r.returncode == 0, r.stderr
            assert r.stdout == repr(sorted(on_fuse.items())) + "\n"


def test_a_killed_daemon_frees_the_layers_and_umount_takes_its_mount_down(tmp_path: Path
                                                                          ) -> None:
    base, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    ok(store(base, "init"))
    ok(store(base, "mount", "--backend", "fuse", str(mnt)))
    (mnt / "f").write_text("f")
    pid = LayerStore(str(base)).mount_rows(LayerStore(str(base)).db())[0].pid
    assert pid is not None
    ok(store(base, "snapshot", "live"))              # through the daemon: it stays mounted
    assert (mnt / "f").read_text() == "f"
    os.kill(pid, 9)                                  # the daemon held the lock: now nobody
    from mounts import wait_gone
    assert wait_gone(pid)
    ok(store(base, "snapshot", "s"))
    ok(store(base, "umount", str(mnt)))              # the dead FUSE mount goes too
    assert mounts_under(tmp_path) == []
    assert ok(store(base, "run", *HOST_TOOLS, "--", "cat", "f")) == "f"


def test_progress_line_on_a_terminal_only(tmp_path: Path) -> None:
    import pty
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_text("x" * 1000)
    r = store(tmp_path / "quiet", "init", "--from", str(src))
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    leader, follower = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "overlayfuse", "store", "--base",
                          str(tmp_path / "tty"), "init", "--from", str(src)],
                         stderr=follower, stdout=subprocess.DEVNULL,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert p.wait(timeout=60) == 0
    os.close(leader)
    assert b"copying " in seen and b"entries" in seen and seen.endswith(b"\r\x1b[K")


def test_the_python_api_takes_configs_and_snapshots(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    import overlayfuse
    config = overlayfuse.LayerStore(str(tmp_path / "store")).config("api")
    config.init()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with overlayfuse.mount(config, str(mnt)) as m:
        assert m.mounted and m.spec.upperdir is not None
        (mnt / "f").write_text("1\n")
    snap = config.snapshot("one")
    assert overlayfuse.run(config, ["sh", "-c", "echo 2 > f"], binds=TOOL_BINDS) == 0       # kept
    assert overlayfuse.run(snap, ["sh", "-c", "cat f; echo 3 > f"], writable=True,
                           binds=TOOL_BINDS) == 0
    assert overlayfuse.run(config, ["cat", "f"], binds=TOOL_BINDS) == 0
    assert capfd.readouterr().out == "1\n2\n"
    with overlayfuse.mount(snap, str(mnt)) as m:                           # read-only
        assert m.spec.upperdir is None and (mnt / "f").read_text() == "1\n"
    assert [(s.name, s.current) for s in config.snapshots()] == [("postinit", False),
                                                                  ("one", True)]
