"""``--overlay SRC:DST`` on ``store run`` and ``store shell``: the host dir SRC shown writable at
DST in the tree, through an overlay of its own with a throwaway upper in the store's ``tmp/``.
SRC is byte for byte the same afterwards, nothing of the upper stays (``gc`` removes it after a
killed run) and DST is no entry of a kept layer; as root and as the normal user ``ovfuser``,
through the kernel and the FUSE backend."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mounts import REPO, tree_snapshot
from test_store_root import TIMEOUT, Who, host_pids_with, layer_entries, ok, who  # noqa: F401

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]


def make_volume(who: Who) -> Path:
    """A host dir with a file, a file to append to and a subdir, owned by ``who``."""
    vol = who.home / f"vol-{uuid.uuid4().hex[:6]}"
    (vol / "sub").mkdir(parents=True)
    (vol / "f").write_text("hello\n")
    (vol / "keep").write_text("kept\n")
    (vol / "sub/g").write_text("g\n")
    return who.own(vol)


def popen(who: Who, *args: str) -> subprocess.Popen[bytes]:
    """``overlayfuse ARGS`` started as ``who``: ``.pid`` is the overlayfuse process."""
    kw: dict[str, object] = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if who.user is None:
        return subprocess.Popen([sys.executable, "-m", "overlayfuse", *args], cwd=who.home,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), **kw)  # type: ignore
    return who.user.popen([who.user.python, "-m", "overlayfuse", *args], **kw)


@pytest.mark.parametrize("backend", ["auto", "fuse"])
def test_overlay_is_writable_inside_and_leaves_the_source(who: Who, backend: str) -> None:
    who.init()
    vol, vol2 = make_volume(who), make_volume(who)
    before, before2 = tree_snapshot(vol, owner=True), tree_snapshot(vol2, owner=True)
    script = ("cat /data/v/f; echo new > /data/v/n; echo more >> /data/v/keep; "
              "busybox rm /data/v/f; busybox mv /data/v/sub /data/v/sub2; "
              "ls /data/v; cat /data/v/keep /data/v/sub2/g /data/v/n; "
              "echo 2 > /w/f; cat /w/f")
    # the second volume is mounted after the first one, on the tree's root: both stay seen
    r = who.store("run", "--backend", backend, "--overlay", f"{vol}:/data/v",
                  "--overlay", f"{vol2}:/w", "--", "sh", "-c", script)
    assert ok(r) == "hello\nkeep\nn\nsub2\nkept\nmore\ng\nnew\n2\n"
    assert tree_snapshot(vol, owner=True) == before
    assert tree_snapshot(vol2, owner=True) == before2
    assert os.listdir(who.base / "tmp") == []
    # the mount points and a parent were made for the run only: no kept layer holds them
    assert not {"data", "data/v", "w"} & layer_entries(who.base)
    # the next run sees SRC as it is, not what the last one wrote
    out = ok(who.store("run", "--backend", backend, "--overlay", f"{vol}:/data/v", "--",
                       "ls", "/data/v"))
    assert out == "f\nkeep\nsub\n"


def test_shell_takes_overlay_too(who: Who) -> None:
    who.init()
    vol = make_volume(who)
    before = tree_snapshot(vol, owner=True)
    r = who.store("shell", "--overlay", f"{vol}:/v",
                  input="echo x > /v/f; cat /v/f; exit 0\n")
    assert ok(r) == "x\n"
    assert tree_snapshot(vol, owner=True) == before
    assert os.listdir(who.base / "tmp") == []


@pytest.mark.parametrize("backend", ["auto", "fuse"])
def test_killed_run_leaves_the_upper_to_gc(who: Who, backend: str) -> None:
    who.init()
    vol = make_volume(who)
    before = tree_snapshot(vol, owner=True)
    mark = 7000 + os.getpid() % 1000
    argv = ["store", "--base", str(who.base), "run", "--backend", backend,
            "--overlay", f"{vol}:/v", "--", "sh", "-c",
            f"echo w > /v/written; busybox rm /v/f; sleep {mark}"]
    proc = popen(who, *argv)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not host_pids_with(f"sleep\0{mark}"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started its command"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 30
    while host_pids_with(f"sleep\0{mark}"):
        assert time.monotonic() < deadline, "the command outlived its killed run"
        time.sleep(0.05)
    # the throwaway upper was in tmp/ with what the command wrote, never in SRC
    left = [n for n in os.listdir(who.base / "tmp") if n.startswith("vol-")
            and not n.endswith(".lock")]
    assert len(left) == 1
    assert any("written" in files for _, _, files in os.walk(who.base / "tmp" / left[0]))
    assert tree_snapshot(vol, owner=True) == before
    ok(who.store("gc"))
    assert os.listdir(who.base / "tmp") == []
    assert tree_snapshot(vol, owner=True) == before


@pytest.mark.parametrize("case", ["missing", "file", "relative", "dotdot", "no-dst"])
def test_bad_overlay_one_line_nothing_changed(who: Who, case: str) -> None:
    who.init()
    vol = make_volume(who)
    text, spec = {
        "missing": ("no such file or directory", f"{who.home}/missing:/v"),
        "file": ("not a directory", f"{vol}/f:/v"),
        "relative": ("outside the tree", f"{vol}:v"),
        "dotdot": ("outside the tree", f"{vol}:/v/../../x"),
        "no-dst": ("expected SRC:DST", str(vol)),
    }[case]
    before = tree_snapshot(who.base / "layers")
    vol_before = tree_snapshot(vol, owner=True)
    r = who.store("run", "--overlay", spec, "--", "true")
    assert r.returncode == 125, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("overlayfuse: ")
    assert text in r.stderr
    assert tree_snapshot(who.base / "layers") == before
    assert os.listdir(who.base / "tmp") == []
    assert tree_snapshot(vol, owner=True) == vol_before
