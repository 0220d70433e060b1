"""A normal user's store runs with the user's subordinate IDs, and its housekeeping removes
what they own: ``chown`` to any ID works inside, the files land in the layers owned by the
subordinate IDs (inside ID N is the N-th subordinate ID), and ``clean``, ``rollback``,
``remove-snapshot``, ``scrub`` and ``gc`` as the user leave nothing behind, also after root
worked on the user's store.  Without ranges a run falls back to one ID and says what to add."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import busybox_tree
from mounts import REPO
from test_store_root import Who, ok
from unpriv import Unprivileged, subordinate_ids

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "touch", "chown", "chmod", "mkfifo", "id",
           "stat", "tar", "true")
SUB_START, SUB_COUNT = 820000, 65536
# owners inside: 1:1, 1000:1000, a mode-000 dir full of files, a fifo of 2:2, a tar with owners
WRITE = ("mkdir -p /w/$1/deep/er && touch /w/$1/one /w/$1/deep/f /w/$1/deep/er/g && "
         "chown 1:1 /w/$1/one && chown -R 1000:1000 /w/$1/deep && mkfifo /w/$1/fifo && "
         "chown 2:2 /w/$1/fifo && chmod 000 /w/$1/deep/er /w/$1/deep && "
         "cd /w/$1 && tar -cf /tmp/t.tar one && mkdir x && tar -xpf /tmp/t.tar -C x && "
         "rm /tmp/t.tar")


@pytest.fixture
def user(unprivileged: Unprivileged) -> Who:
    return Who(unprivileged, unprivileged.home)


@pytest.fixture
def subids(unprivileged: Unprivileged) -> Iterator[int]:
    with subordinate_ids(unprivileged.user, SUB_START, SUB_COUNT):
        yield SUB_START


def init(who: Who) -> None:
    src = who.home / f"src-{uuid.uuid4().hex[:6]}"
    busybox_tree(src, APPLETS, dirs=("bin", "etc", "root", "tmp", "w"))
    ok(who.store("init", "--from", str(who.own(src))))


def write(who: Who, tag: str, *args: str) -> subprocess.CompletedProcess[str]:
    return who.store("run", *args, "--", "sh", "-c", WRITE, "sh", tag)


def quiet(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 0 and nothing on stderr: housekeeping that worked says nothing."""
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def owners(layer: Path, tag: str) -> dict[str, tuple[int, int]]:
    top = layer / "w" / tag
    return {str(p.relative_to(top)): (p.lstat().st_uid, p.lstat().st_gid)
            for p in [top, *top.rglob("*")]}


def upper_of(who: Who, tag: str) -> Path:
    found = [d for d in (who.base / "layers").iterdir() if (d / "w" / tag).exists()]
    assert len(found) == 1, found
    return found[0]


def leftovers(who: Who) -> dict[str, list[str]]:
    """What the store holds on disk besides its layers' (listed as root)."""
    return {d: sorted(os.listdir(who.base / d)) for d in ("layers", "work", "tmp")}


def test_run_maps_the_subordinate_ids(user: Who, subids: int) -> None:
    init(user)
    r = write(user, "a", "-v")
    assert r.returncode == 0, r.stderr
    assert f"{subids}-{subids + SUB_COUNT - 1} (/etc/subuid)" in r.stderr
    u = user.user
    assert u is not None
    out = ok(user.store("run", "--", "cat", "/proc/self/uid_map", "/proc/self/gid_map"))
    assert [line.split() for line in out.splitlines()] == [
        ["0", str(u.uid), "1"], ["1", str(subids), str(SUB_COUNT)],
        ["0", str(u.gid), "1"], ["1", str(subids), str(SUB_COUNT)]]
    layer = upper_of(user, "a")
    # inside ID N is subids + N - 1 on the host; root inside is the user
    base, k = subids - 1, 1000
    assert owners(layer, "a") == {
        ".": (u.uid, u.gid), "one": (base + 1, base + 1), "fifo": (base + 2, base + 2),
        "deep": (base + k, base + k), "deep/f": (base + k, base + k),
        "deep/er": (base + k, base + k), "deep/er/g": (base + k, base + k),
        "x": (u.uid, u.gid), "x/one": (base + 1, base + 1)}
    assert stat.S_ISFIFO((layer / "w/a/fifo").lstat().st_mode)
    assert stat.S_IMODE((layer / "w/a/deep").lstat().st_mode) == 0
    # and inside they show as the IDs they were given
    out = ok(user.store("run", "--", "stat", "-c", "%n %u %g", "/w/a/one", "/w/a/fifo",
                        "/w/a/x/one"))
    assert out.split("\n")[:3] == ["/w/a/one 1 1", "/w/a/fifo 2 2", "/w/a/x/one 1 1"]


def test_map_root_maps_one_id(user: Who, subids: int) -> None:
    init(user)
    u = user.user
    assert u is not None
    r = user.store("run", "--map-root", "-v", "--", "sh", "-c",
                   "cat /proc/self/uid_map; touch /f; chown 1:1 /f 2>&1; true")
    assert r.returncode == 0, r.stderr
    assert "one ID (0 is uid" in r.stderr and "as asked" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["0", str(u.uid), "1"] and "Invalid argument" in lines[1]


def test_without_ranges_one_id_and_what_to_add(user: Who, no_subids: None) -> None:
    u = user.user
    assert u is not None
    init(user)
    r = user.store("run", "-v", "--", "sh", "-c",
                   "cat /proc/self/uid_map; touch /f; chown 1:1 /f 2>&1; true")
    assert r.returncode == 0, r.stderr
    assert f"no range for {u.user} in /etc/subuid" in r.stderr
    assert "usermod --add-subuids" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["0", str(u.uid), "1"] and "Invalid argument" in lines[1]
    # housekeeping of what one ID wrote (a mode-000 dir) needs no namespace at all
    ok(user.store("run", "--", "sh", "-c", "mkdir -p /z/y && touch /z/y/f && chmod 000 /z/y /z"))
    quiet(user.store("clean"))
    quiet(user.store("scrub"))
    assert leftovers(user) == {"layers": [], "work": [], "tmp": []}


def test_housekeeping_removes_what_subordinate_ids_own(user: Who, subids: int) -> None:
    init(user)
    ok(write(user, "a"))
    quiet(user.store("snapshot", "s1"))
    ok(write(user, "b"))
    b = upper_of(user, "b")
    quiet(user.store("clean"))
    assert not b.exists()
    ok(write(user, "c"))
    quiet(user.store("snapshot", "s2"))
    c = upper_of(user, "c")
    ok(write(user, "d"))
    d = upper_of(user, "d")
    quiet(user.store("rollback", "s1"))
    assert not d.exists() and c.exists()
    quiet(user.store("remove-snapshot", "s2"))
    assert not c.exists()
    # a throwaway upper full of subordinate IDs' files goes with its run
    ok(write(user, "e", "--writable"))
    assert os.listdir(user.base / "tmp") == []
    quiet(user.store("scrub"))
    assert leftovers(user) == {"layers": [], "work": [], "tmp": []}
    assert quiet(user.store("gc")) == "gc: 0 layers kept, 0 dirs and 0 leftovers removed\n"


def test_gc_removes_leftovers_subordinate_ids_own(user: Who, subids: int) -> None:
    """What a killed run leaves: a dead layer dir and a tmp entry, owned by subordinate IDs
    (their tops too: a dir moves out of layers/ only with write access to itself)."""
    init(user)
    dead_layer = user.base / "layers" / "0123456789abcdef"
    dead_tmp = user.base / "tmp" / "new-0123456789ab"
    for top in (dead_layer, dead_tmp):
        (top / "a/b").mkdir(parents=True)
        (top / "a/b/f").write_text("x")
        for p in (top / "a/b/f", top / "a/b", top / "a", top):
            os.chown(p, subids + 4, subids + 4)
        os.chmod(top / "a/b", 0)
        os.chmod(top / "a", 0)
    r = user.store("gc")
    assert quiet(r) == "gc: 1 layers kept, 1 dirs and 1 leftovers removed\n"
    assert not dead_layer.exists() and not dead_tmp.exists()
    assert leftovers(user)["tmp"] == []


def test_gc_reports_what_it_cannot_remove(user: Who, subids: int) -> None:
    """A dir of an ID outside the user's map stays: one line, status 1, and never counted."""
    init(user)
    stuck = user.base / "tmp" / "new-stuck0000000"
    (stuck / "d").mkdir(parents=True)
    (stuck / "d/f").write_text("x")
    try:
        r = user.store("gc")
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith("overlayfuse: gc removed 0 dirs and 0 leftovers, but "
                                   f"cannot remove {stuck}"), r.stderr
        assert (stuck / "d/f").exists()
    finally:
        shutil.rmtree(stuck)


def root_store(who: Who, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayfuse", "store", "--base",
                           str(who.base), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/")


def test_root_on_the_users_store_leaves_it_removable(user: Who, subids: int) -> None:
    init(user)
    u = user.user
    assert u is not None
    ok(write(user, "a"))
    quiet(user.store("snapshot", "s1"))
    # root runs in the user's map: root inside is the user, 1 is the first subordinate ID
    ok(root_store(user, "run", "--", "sh", "-c", WRITE + " && mkdir /w/$1/r && chmod 700 "
                  "/w/$1/r && touch /w/$1/r/f", "sh", "r"))
    layer = upper_of(user, "r")
    got = owners(layer, "r")
    assert got["r"] == got["r/f"] == got["."] == (u.uid, u.gid)
    assert got["one"] == (subids, subids)
    ok(root_store(user, "run", "--writable", "--", "sh", "-c", WRITE, "sh", "t"))
    # a root process killed while it held a tmp entry with a fresh layer in it (as ``take``
    # makes them): left to the user's gc
    code = ("import os; from overlayfuse.store.disk import Layout, TmpEntry, make_layer_root; "
            f"t = TmpEntry(Layout({str(user.base)!r}), 'new-killedroot00'); "
            f"make_layer_root(t.path + '/layer', None, ({u.uid}, {u.gid})); "
            "open(t.path + '/layer/f', 'w').close(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ,
                   PYTHONPATH=str(REPO)))
    quiet(user.store("snapshot", "s2"))
    quiet(user.store("rollback", "s1"))
    quiet(user.store("remove-snapshot", "s2"))
    assert not layer.exists()
    quiet(user.store("scrub"))
    assert quiet(user.store("gc")) == "gc: 0 layers kept, 0 dirs and 1 leftovers removed\n"
    assert leftovers(user) == {"layers": [], "work": [], "tmp": []}


def test_build_step_giving_the_root_to_a_subordinate_id(user: Who, subids: int) -> None:
    """A step that chowns ``/`` leaves an upper owned by a subordinate ID: the user cannot move
    it into layers/ by a plain rename (a dir changes parent only with write access to itself),
    so the store does it as root of the user's namespace; the build keeps the step's layer.
    So for a fresh upper whose root denies its owner writes, and for such an imported root."""
    init(user)
    r = user.build(["chown 1000:1000 / && touch /built"])
    assert r.returncode == 0, r.stderr
    assert "built default: 1 steps, 1 ran, 0 cached; key " in r.stderr
    layer = upper_of_file(user, "built")
    base = subids - 1
    assert (layer.lstat().st_uid, layer.lstat().st_gid) == (base + 1000, base + 1000)
    assert leftovers(user)["tmp"] == []
    # the layer is the config's current state, and a rerun takes it from the cache
    assert ok(user.store("run", "--", "ls", "/built")) == "/built\n"
    # the next run's fresh upper gives the tree's root the owner the step gave it
    assert ok(user.store("run", "--", "stat", "-c", "%u:%g", "/")) == "1000:1000\n"
    # and the mount points made for the step were taken out of its layer again
    assert not {"proc", "dev", "sys"} & {p.name for p in layer.iterdir()}
    r = user.build(["chown 1000:1000 / && touch /built"])
    assert r.returncode == 0 and "[1/1] cached" in r.stderr, r.stderr
    # the same move for a fresh upper whose root keeps a mode that denies its owner writes,
    # and for a tarball whose root entry is such a dir
    quiet(user.store("run", "--", "chmod", "555", "/"))
    quiet(user.store("snapshot", "s"))
    assert ok(user.store("run", "--", "stat", "-c", "%a", "/")) == "555\n"
    tar = user.home / "root.tar"
    with tarfile.open(tar, "w") as tf:
        root = tarfile.TarInfo(".")
        root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o555, 1000, 1000
        tf.addfile(root)
    user.own(tar)
    before = set((user.base / "layers").iterdir())
    ok(user.store("--config", "t", "init", "--from-tar", str(tar)))
    [imported] = set((user.base / "layers").iterdir()) - before
    st = imported.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o555, base + 1000)


def upper_of_file(who: Who, name: str) -> Path:
    found = [d for d in (who.base / "layers").iterdir() if (d / name).exists()]
    assert len(found) == 1, found
    return found[0]
