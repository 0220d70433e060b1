"""Builds a CI can trust: what a step sees is in its key, and nothing else is.

Each invalidation (a copied file's content, a mode, a new file in a copied dir, an ``ENV``
line, ``--env``, a moved base snapshot) reruns that step and the ones after it and keeps the
ones before; each non-invalidation (an mtime, a comment, the caller's environment) reruns
nothing.  Two stores agree on every key for the same base tarball, root's and a normal user's
alike; ``--failed`` enters a failed step's state; ``gc --build-cache`` frees exactly the steps
nothing needs; bad input is one line naming the step file's line, and nothing is built.
"""
from __future__ import annotations

import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from helpers import ovf
from overlayfuse import LayerStore
from test_store_root import HOST_TOOLS, Who, ok
from unpriv import Unprivileged, subordinate_ids

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

STEP_LINE = re.compile(r"\[(\d+)/\d+\] (cached|ran) +([0-9a-f]{12}) ")
SUB_START, SUB_COUNT = 870000, 65536
# config, step, key, size, last used, needed/spare, text
LIST_LINE = re.compile(r"^(\S+) +(\d+|\?) +([0-9a-f]{12}) +(.+?) +(\d+ (?:min|h|d) ago) +"
                       r"(needed|spare) +(.*)$")


class Project:
    """A step file with its inputs in ``ctx``, built into the store at ``base``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "store"
        self.ctx = root / "ctx"
        (self.ctx / "conf").mkdir(parents=True)
        (self.ctx / "app.txt").write_text("app v1\n")
        (self.ctx / "conf" / "a.conf").write_text("a=1\n")
        (self.ctx / "tool.sh").write_text("#!/bin/sh\necho tool\n")
        self.write_steps()

    def write_steps(self, *, env: str = "APPVER=1", comment: str = "") -> None:
        (self.ctx / "steps").write_text(
            f"# the app{comment}\n"
            "mkdir -p /opt && echo base > /opt/first\n"
            "COPY app.txt tool.sh /opt/\n"
            "COPY conf /etc/app\n"
            f"ENV {env}\n"
            "echo \"$APPVER $FROMCLI $LEAK\" > /opt/version\n"
            "cat /opt/app.txt /etc/app/*.conf > /opt/all; ls -l /opt/tool.sh > /opt/mode\n")

    def build(self, *args: str, env: dict[str, str] | None = None, config: str = "app"
              ) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, str, str]]]:
        r = ovf("build", "--base", str(self.base), "--config", config, *HOST_TOOLS, *args,
                str(self.ctx / "steps"), env=env or {})
        return r, [(int(n), how, key) for n, how, key in STEP_LINE.findall(r.stderr)]

    def run(self, *cmd: str, config: str = "app") -> str:
        return ok(ovf("store", "--base", str(self.base), "--config", config, "run",
                      *HOST_TOOLS, "--", *cmd))


def ran(steps: list[tuple[int, str, str]]) -> list[int]:
    return [n for n, how, _ in steps if how == "ran"]


def test_each_input_invalidates_its_step_and_the_rest(tmp_path: Path) -> None:
    p = Project(tmp_path)
    r, steps = p.build()
    assert r.returncode == 0, r.stderr
    assert ran(steps) == [1, 2, 3, 4, 5]
    assert p.run("cat", "/opt/version", "/opt/all") == "1  \napp v1\na=1\n"
    assert p.run("sh", "-c", "stat -c '%u:%g %a' /opt/app.txt /etc/app/a.conf") == \
        "0:0 644\n0:0 644\n"

    def again(expect: list[int], *args: str, env: dict[str, str] | None = None) -> None:
        r, steps = p.build(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert ran(steps) == expect, r.stderr
        assert [n for n, how, _ in steps if how == "cached"] == [
            n for n in range(1, 6) if n not in expect]

    # not inputs: mtimes, a comment, the caller's environment
    past = time.time() - 3600
    for f in (p.ctx / "app.txt", p.ctx / "conf" / "a.conf", p.ctx / "conf"):
        os.utime(f, (past, past))
    p.write_steps(comment=" (a comment changed)")
    again([], env={"APPVER": "99", "LEAK": "leaked", "FROMCLI": "x"})
    assert p.run("cat", "/opt/version") == "1  \n"

    # inputs: a copied file's content, a mode, a new file in a copied dir, ENV, --env
    (p.ctx / "app.txt").write_text("app v2\n")
    again([2, 3, 4, 5])
    assert p.run("cat", "/opt/all") == "app v2\na=1\n"
    (p.ctx / "tool.sh").chmod(0o755)
    again([2, 3, 4, 5])
    assert p.run("cat", "/opt/mode").startswith("-rwxr-xr-x")
    (p.ctx / "conf" / "b.conf").write_text("b=2\n")
    again([3, 4, 5])
    assert p.run("cat", "/opt/all") == "app v2\na=1\nb=2\n"
    p.write_steps(env="APPVER=2")
    again([4, 5])
    assert p.run("cat", "/opt/version") == "2  \n"
    # --env is there from the first step on, so every key after it changes
    again([1, 2, 3, 4, 5], "--env", "FROMCLI=cli")
    assert p.run("cat", "/opt/version") == "2 cli \n"
    again([], "--env", "FROMCLI=cli")
    again([1, 2, 3, 4, 5], "--env", "APPVER=7")       # --env wins over the step file's ENV
    assert p.run("cat", "/opt/version") == "7  \n"


def test_a_moved_base_snapshot_invalidates_the_build(tmp_path: Path) -> None:
    p = Project(tmp_path)
    (p.ctx / "base-steps").write_text("mkdir -p /etc && echo one > /etc/os\n")
    base_build = ["build", "--base", str(p.base), "--config", "os", *HOST_TOOLS,
                  "--tag", "stable", str(p.ctx / "base-steps")]
    ok(ovf(*base_build))
    r, steps = p.build("--from-config", "os:stable")
    assert r.returncode == 0 and ran(steps) == [1, 2, 3, 4, 5], r.stderr
    r, steps = p.build("--from-config", "os:stable")
    assert r.returncode == 0 and ran(steps) == [], r.stderr

    (p.ctx / "base-steps").write_text("mkdir -p /etc && echo two > /etc/os\n")
    r = ovf(*base_build)
    assert r.returncode == 1 and "snapshot 'stable' exists already" in r.stderr, r.stderr
    ok(ovf(*base_build[:-1], "--force", str(p.ctx / "base-steps")))
    r, steps = p.build()          # the config follows its origin, flag or not
    assert r.returncode == 0 and ran(steps) == [1, 2, 3, 4, 5], r.stderr
    assert "the base os:stable moved" in r.stderr
    assert p.run("cat", "/etc/os") == "two\n"
    store = LayerStore(str(p.base))
    assert store.config("app").refs()[".base"] == store.config("os").refs()["stable"]


def test_tag_and_snapshot_refuse_an_existing_name_unless_forced(tmp_path: Path) -> None:
    p = Project(tmp_path)
    r, _ = p.build("--tag", "v1")
    assert r.returncode == 0, r.stderr
    store = LayerStore(str(p.base))
    v1 = store.config("app").refs()["v1"]
    p.write_steps(env="APPVER=2")
    r, steps = p.build("--tag", "v1")
    assert r.returncode == 1 and steps == [], r.stderr       # refused before any step runs
    assert r.stderr.strip().splitlines() == [
        "overlayfuse: snapshot 'v1' exists already in config 'app' (--force moves it to the "
        "result)"]
    assert store.config("app").refs()["v1"] == v1
    r, _ = p.build("--tag", "v1", "--force")
    assert r.returncode == 0, r.stderr
    assert store.config("app").refs()["v1"] != v1
    snap = ["store", "--base", str(p.base), "--config", "app", "snapshot"]
    r = ovf(*snap, "v1")
    assert r.returncode == 1 and "(--force moves it)" in r.stderr
    ok(ovf(*snap, "--force", "v1"))


def test_two_stores_agree_on_every_key(tmp_path: Path, unprivileged: Unprivileged) -> None:
    """Root's store and a normal user's (subordinate IDs) build the same step file on the
    same tarball, with owners other than root in it: the same keys, step by step."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os").write_text("base\n")
    (tree / "srv").mkdir()
    os.chown(tree / "srv", 33, 33)
    tarball = tmp_path / "base.tar"
    with tarfile.open(tarball, "w") as t:
        t.add(tree, ".")
    p = Project(tmp_path / "root")
    r1, keys1 = p.build("--from-tar", str(tarball))
    assert r1.returncode == 0, r1.stderr
    p2 = Project(tmp_path / "root2")
    r2, keys2 = p2.build("--from-tar", str(tarball))
    assert keys2 == keys1

    u = unprivileged
    proj = Project(u.home / "proj")
    u.chown(proj.root)
    utar = u.home / "base.tar"
    utar.write_bytes(tarball.read_bytes())
    u.chown(utar)
    who = Who(u, u.home)
    with subordinate_ids(u.user, SUB_START, SUB_COUNT):
        r3 = who.ovf("build", "--base", str(proj.base), "--config", "app", *HOST_TOOLS,
                     "--from-tar", str(utar), str(proj.ctx / "steps"))
        assert r3.returncode == 0, r3.stderr
        keys3 = [(int(n), how, key) for n, how, key in STEP_LINE.findall(r3.stderr)]
        assert keys3 == keys1
        assert r3.stderr.split("; key ")[1][:64] == r1.stderr.split("; key ")[1][:64]
        # the copies are root's in the tree: the user's own IDs on disk
        out = ok(who.ovf("store", "--base", str(proj.base), "--config", "app", "run",
                         *HOST_TOOLS, "--", "stat", "-c", "%u:%g", "/opt/app.txt", "/srv"))
        assert out == "0:0\n33:33\n"


def test_a_failed_step_can_be_entered(tmp_path: Path) -> None:
    p = Project(tmp_path)
    with open(p.ctx / "steps", "a") as f:
        f.write("echo partial > /opt/partial; echo \"$APPVER\" > /opt/env; exit 3\n"
                "echo never > /opt/never\n")
    r, steps = p.build()
    assert r.returncode == 3 and ran(steps) == [1, 2, 3, 4, 5], r.stderr
    assert "[6/7] failed with exit status 3" in r.stderr
    assert f"overlayfuse store --base {p.base} --config app shell --failed" in r.stderr
    store = ["store", "--base", str(p.base), "--config", "app"]
    out = ok(ovf(*store, "run", "--failed", *HOST_TOOLS, "--", "sh", "-c",
                 "cat /opt/partial /opt/env; echo $APPVER; touch /opt/scratch"))
    assert out == "partial\n1\n1\n"
    # a throwaway upper: nothing of the shell's is kept, the failed state stays as it was
    out = ok(ovf(*store, "shell", "--failed", *HOST_TOOLS,
                 input="ls /opt; exit 0\n"))
    assert out.split() == ["all", "app.txt", "env", "first", "mode", "partial", "tool.sh",
                           "version"]
    # the current state is the last good build's (none yet: the base)
    assert ok(ovf(*store, "run", *HOST_TOOLS, "--", "ls", "/")).split().count("opt") == 0
    # the next build replaces it
    p.write_steps()
    r, steps = p.build()
    assert r.returncode == 0 and ran(steps) == [], r.stderr
    r = ovf(*store, "run", "--failed", *HOST_TOOLS, "--", "true")
    assert r.returncode == 125 and "has no failed build step" in r.stderr, r.stderr


def test_the_cache_lists_and_prunes_exactly_the_unneeded_steps(tmp_path: Path) -> None:
    p = Project(tmp_path)
    r, first = p.build("--tag", "v1")
    assert r.returncode == 0, r.stderr
    p.write_steps(env="APPVER=2")
    r, second = p.build()
    assert r.returncode == 0, r.stderr
    p.write_steps(env="APPVER=3")
    r, third = p.build()
    assert r.returncode == 0, r.stderr
    lst = ok(ovf("build", "--base", str(p.base), "--list"))
    rows = [LIST_LINE.match(line).groups() for line in lst.splitlines()[1:]]  # type: ignore
    state = {(int(r[1]), r[2]): r[5] for r in rows}
    # v1 holds the first build's steps; the current state the third's; the second's 4 and 5
    # are held by nothing
    spare = {(n, k) for n, _, k in second if n in (4, 5)}
    assert {k for k, s in state.items() if s == "spare"} == spare, lst
    assert len(rows) == 9 and all(r[0] == "app" for r in rows)
    assert {r[6] for r in rows if r[1] == "2"} == {"COPY app.txt tool.sh /opt/"}
    layers_before = set(os.listdir(p.base / "layers"))
    store = LayerStore(str(p.base))
    spare_layers = {layer for k, layer in store.db().execute("SELECT key, layer FROM steps")
                    if k[:12] in {k for _, k in spare}}
    out = ok(ovf("store", "--base", str(p.base), "gc", "--build-cache"))
    assert out.startswith("gc: 2 cached build steps removed (") and "), 7 kept" in out, out
    assert set(os.listdir(p.base / "layers")) == layers_before - spare_layers
    assert len(spare_layers) == 2
    # what stays still builds from the cache: v1's steps by rollback, the current ones as is
    r, steps = p.build()
    assert r.returncode == 0 and ran(steps) == [], r.stderr
    # dropping v1 makes its own steps spare; --older-than keeps what was used lately
    ok(ovf("store", "--base", str(p.base), "--config", "app", "remove-snapshot", "v1"))
    out = ok(ovf("store", "--base", str(p.base), "gc", "--build-cache", "--older-than", "1"))
    assert out.startswith("gc: 0 cached build steps removed"), out
    out = ok(ovf("store", "--base", str(p.base), "gc", "--build-cache", "--max-size", "0"))
    assert out.startswith("gc: 2 cached build steps removed"), out
    assert p.run("cat", "/opt/version") == "3  \n"


@pytest.mark.parametrize("line, says", [
    ("COPY missing.txt /opt/", "COPY source missing.txt: no such file or directory"),
    ("COPY ../outside /opt/", "COPY source ../outside leaves the step file's directory"),
    ("COPY nothing-*.txt /opt/", "COPY source nothing-*.txt: nothing matches"),
    ("COPY app.txt", "COPY needs SRC... DST"),
    ("ENV 1BAD=x", "ENV expects NAME=VALUE, not '1BAD=x'"),
    ("ENV NOVALUE", "ENV expects NAME=VALUE, not 'NOVALUE'"),
    ("ENV A='unclosed", "ENV: No closing quotation"),
])
def test_bad_step_files_build_nothing(tmp_path: Path, line: str, says: str) -> None:
    p = Project(tmp_path)
    (tmp_path / "outside").write_text("secret\n")
    steps = p.ctx / "steps"
    steps.write_text("echo one > /one\n\n" + line + "\necho two > /two\n")
    r, ran_steps = p.build()
    assert r.returncode == 1 and ran_steps == []
    assert r.stderr.splitlines() == [f"overlayfuse: {steps}:3: {says}" + (
        f" in {p.ctx}" if "nothing matches" in says or "no such" in says else
        f" {p.ctx}" if "leaves" in says else "")], r.stderr
    assert not p.base.exists()


def test_copy_never_follows_a_tree_symlink_out_of_the_tree(tmp_path: Path) -> None:
    """Symlinks a step left in the tree resolve inside it (an absolute one at the tree's
    root, a ``..`` stops there), the destination's own included, as a Containerfile's COPY
    resolves them; below the destination nothing is followed.  The host is never written."""
    p = Project(tmp_path)
    host = tmp_path / "host"
    host.mkdir()
    (host / "victim").write_text("host file\n")
    rel = "../" * 12 + str(host).lstrip("/")
    (p.ctx / "steps").write_text(
        f"ln -s {host} /abs && ln -s {rel} /rel && mkdir -p /opt && "
        f"ln -s {host}/victim /opt/victim\n"
        "COPY app.txt /abs/\n"
        "COPY app.txt /rel/sub/copied\n"
        "COPY app.txt /opt/victim\n"
        "COPY conf /abs/conf\n"
        f"mkdir -p /d && ln -s {host} /d/a.conf\n"
        "COPY conf /d\n")
    r, steps = p.build()
    assert r.returncode == 0 and ran(steps) == [1, 2, 3, 4, 5, 6, 7], r.stderr
    assert sorted(os.listdir(host)) == ["victim"]
    assert (host / "victim").read_text() == "host file\n"
    inside = p.run("sh", "-c", f"cat {host}/app.txt {host}/sub/copied {host}/conf/a.conf "
                               f"{host}/victim; test -L /d/a.conf || cat /d/a.conf")
    assert inside == "app v1\napp v1\na=1\napp v1\na=1\n"


def test_a_copy_that_cannot_land_fails_its_step(tmp_path: Path) -> None:
    p = Project(tmp_path)
    (p.ctx / "steps").write_text("mkdir -p /opt && echo file > /opt/first\n"
                                 "COPY app.txt /opt/first/x\n")
    r, steps = p.build()
    assert r.returncode == 1 and ran(steps) == [1], r.stderr
    assert ("overlayfuse build: COPY to /opt/first/x: COPY destination /opt/first: /opt/first "
            "is not a directory in the tree") in r.stderr
    assert "[2/2] failed with exit status 1" in r.stderr
    assert p.run("ls", "/").split().count("opt") == 0
    assert ok(ovf("store", "--base", str(p.base), "--config", "app", "run", "--failed",
                  *HOST_TOOLS, "--", "cat", "/opt/first")) == "file\n"


def test_keys_ignore_what_a_backend_keeps_for_itself(tmp_path: Path) -> None:
    """A base written through the FUSE daemon (copy-ups leave origin handles and the inode
    numbers the entries had, different in every store) gives the same keys as the same
    content written in another store."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "app.conf").write_text("v1\n")
    keys = []
    for n in (1, 2):
        p = Project(tmp_path / f"p{n}")
        store = ["store", "--base", str(p.base)]
        mnt = tmp_path / f"mnt{n}"
        mnt.mkdir()
        ok(ovf(*store, "init", "--from", str(src)))
        ok(ovf(*store, "mount", "--backend", "fuse", str(mnt)))
        try:
            (mnt / "etc" / "app.conf").write_text("v2\n")     # a copy-up of a lower file
        finally:
            ok(ovf(*store, "umount", str(mnt)))
        ok(ovf(*store, "snapshot", "s"))
        r, steps = p.build("--from-config", "default:s")
        assert r.returncode == 0 and ran(steps) == [1, 2, 3, 4, 5], r.stderr
        keys.append(steps)
    assert keys[0] == keys[1]
