"""``overlayfuse run``: a command in a merged tree, its exit status, signals, nothing left."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import overlayfuse
from helpers import ovf
from mounts import REPO, kernel_overlay, make_layers, mounts_under, tree_snapshot
from overlayfuse.backends import CommandError
from overlayfuse.spec import OverlaySpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")

TESTS = Path(__file__).resolve().parent
RUN_BACKENDS = ("kernel", "kernel-userns", "fuse")
DUMP = ("import json, sys; sys.path.insert(0, {tests!r}); from mounts import tree_snapshot; "
        "print(json.dumps(tree_snapshot('.')))")


@pytest.fixture(autouse=True)
def _private_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """Own probe cache and own TMPDIR: the throwaway uppers must be gone afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    tmp = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def fingerprint(root: Path) -> dict[str, tuple]:
    """Everything about a tree that a run must not change: bytes, modes, owners, times, xattrs."""
    out: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            p = os.path.join(d, name) if name else d
            st = os.lstat(p)
            data = None
            if stat.S_ISREG(st.st_mode):
                data = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            xattrs = {} if stat.S_ISLNK(st.st_mode) else \
                {a: os.getxattr(p, a) for a in os.listxattr(p)}
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, st.st_rdev, data,
                                             sorted(xattrs.items()))
    return out


def make_lowers(tmp_path: Path) -> list[Path]:
    ly = make_layers(tmp_path / "layers")
    top, bottom = ly.lowers
    (bottom / "keep").write_text("keep")
    (bottom / "remove").write_text("remove")
    (bottom / "edit").write_text("before")
    (bottom / "d").mkdir()
    (bottom / "d" / "inner").write_text("inner")
    (top / "top").write_text("top")
    return ly.lowers


SCRIPT = ('test "$PWD" = "$OVERLAYFUSE_MERGED" || exit 90; '
          'rm remove; echo after > edit; echo made > new; rm -r d; mkdir d; '
          'echo fresh > d/other; exit 3')


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_writable_leaves_lowers_untouched_and_removes_upper(tmp_path: Path, backend: str,
                                                            _private_env: Path) -> None:
    lowers = make_lowers(tmp_path)
    before = {str(p): fingerprint(p) for p in lowers}
    r = ovf("run", "-v", "--backend", backend, "--writable",
            "-o", "lowerdir=" + ":".join(map(str, lowers)), "--", "sh", "-c", SCRIPT)
    assert r.returncode == 3, r.stderr
    assert f"backend {backend}" in r.stderr
    assert {str(p): fingerprint(p) for p in lowers} == before
    assert os.listdir(_private_env) == []           # the throwaway upper and work are gone
    assert mounts_under(tmp_path) == [] and mounts_under(_private_env) == []


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_keep_upper_keeps_changes_in_the_layer_format(tmp_path: Path, backend: str) -> None:
    lowers = make_lowers(tmp_path)
    kept = tmp_path / "kept"
    dump = DUMP.format(tests=str(TESTS))
    r = ovf("run", "--backend", backend, "--keep-upper", str(kept),
            "-o", "lowerdir=" + ":".join(map(str, lowers)), "--", "sh", "-c",
            SCRIPT.replace("exit 3", f"{sys.executable} -c \"{dump}\""))
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    st = os.lstat(kept / "remove")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0          # whiteout char 0/0
    assert (kept / "edit").read_text() == "after\n"
    assert (kept / "new").read_text() == "made\n"
    assert (kept / "d" / "other").read_text() == "fresh\n"
    assert not (kept / "d" / "inner").exists()
    assert sorted(os.listdir(tmp_path)) == ["kept", "layers"]    # its work dir is gone
    # the kept upper is a real overlay layer: the kernel shows what the command saw
    work, mnt = tmp_path / "w", tmp_path / "m"
    work.mkdir()
    mnt.mkdir()
    opts = "redirect_dir=on" if backend != "kernel-userns" else "userxattr"
    with kernel_overlay(lowers, kept, work, mnt, opts=opts):
        assert json.loads(json.dumps(tree_snapshot(mnt))) == seen


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_signals_reach_the_command_and_nothing_stays(tmp_path: Path, backend: str) -> None:
    lowers = make_lowers(tmp_path)
    mp = tmp_path / "mp"
    mp.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-m", "overlayfuse", "run", "--backend", backend, "--writable",
         "--mountpoint", str(mp), "-o", "lowerdir=" + ":".join(map(str, lowers)), "--",
         "sh", "-c", 'trap "echo got-term; exit 7" TERM; echo ready; '
                     'while :; do sleep 0.05; done'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    assert out == "got-term\n"
    assert mounts_under(mp) == []


def test_exit_status_of_signals_and_missing_commands(tmp_path: Path) -> None:
    lowers = make_lowers(tmp_path)
    opt = "lowerdir=" + ":".join(map(str, lowers))
    assert ovf("run", "-o", opt, "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9
    r = ovf("run", "-o", opt, "--", "no-such-command-here")
    assert r.returncode == 127
    assert r.stderr.strip() == ("overlayfuse: cannot run no-such-command-here: "
                                "No such file or directory")
    r = ovf("run", "-o", opt, "--", "sh", "-c", "echo x > new")   # read-only without upper
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    r = ovf("run", "-o", f"lowerdir={tmp_path}/missing", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith("overlayfuse: ")
    assert "Traceback" not in r.stderr


def test_run_api(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    lowers = make_lowers(tmp_path)
    spec = OverlaySpec(tuple(map(str, lowers)))
    status = overlayfuse.run(spec, ["sh", "-c", "cat top keep; exit 5"], writable=True)
    assert status == 5
    assert capfd.readouterr().out == "topkeep"
    with pytest.raises(CommandError) as e:
        overlayfuse.run(spec, ["no-such-command-here"])
    assert e.value.status == 127
    # cwd is relative to the merged root
    assert overlayfuse.run(spec, ["test", "-f", "inner"], cwd="d") == 0


def test_unprivileged_run_uses_a_user_namespace(unprivileged: Any) -> None:
    u = unprivileged
    ly = u.make_layers()
    (ly.lowers[1] / "f").write_text("lower")
    (ly.lowers[1] / "gone").write_text("gone")
    u.chown(ly.lowers[1] / "f", ly.lowers[1] / "gone")
    before = fingerprint(ly.lowers[1])
    kept = u.home / "kept"
    r = u.run([u.python, "-m", "overlayfuse", "run", "-v", "--keep-upper", str(kept),
               "-o", f"lowerdir={ly.lowers[0]}:{ly.lowers[1]}", "--",
               "sh", "-c", "id -u; rm gone; echo new > f"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "backend kernel-userns" in r.stderr
    assert r.stdout == f"{u.uid}\n"                  # the uid maps to itself
    st = os.lstat(kept / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_uid == u.uid
    assert (kept / "f").read_text() == "new\n"
    assert fingerprint(ly.lowers[1]) == before
    r = u.run([u.python, "-m", "overlayfuse", "run", "--map-root", "--backend", "kernel-userns",
               "-o", f"lowerdir={ly.lowers[1]}", "--", "id", "-u"], capture_output=True, text=True)
    assert r.stdout == "0\n", r.stderr
    assert mounts_under(u.home) == []
