"""The store survives being killed at any point and being used by 8 processes at once.

Kill test: store commands (snapshot, rollback, init --from, run, build, remove-snapshot,
clean) are SIGKILLed after a random delay, over many runs; after each, ``gc`` must leave a
consistent store: every reference and build step names a layer that is in the catalog and on
disk, every layer dir on disk is in the catalog, tmp/ is empty, and every snapshot a command
finished making is still there with its content.

Race test: 8 processes loop over snapshots, rollbacks, runs (writable and throwaway) and
builds on one store while this process fingerprints every frozen layer again and again: a
layer that can serve as a lower must never change, and the store must stay consistent.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from mounts import mounts_under
from overlayfuse import LayerStore
from overlayfuse.store import catalog as cat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")

ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    ENV["XDG_CACHE_HOME"] = os.environ["XDG_CACHE_HOME"]


def check_consistent(base: Path) -> dict[str, str]:
    """gc, then the invariants; returns snapshot -> layer for the callers' own checks."""
    store = LayerStore(str(base))
    try:
        report = store.gc()
        assert report["missing"] == 0, report
        conn = store.db()
        known = cat.layer_ids(conn)
        held = {r[0] for r in conn.execute("SELECT layer FROM refs UNION SELECT layer FROM steps")}
        assert held <= known, held - known
        for layer in known:
            parent = cat.parent_of(conn, layer)
            assert parent is None or parent in known
            assert cat.holders(conn, layer), f"layer {layer} is in the catalog, held by nothing"
        on_disk = set(os.listdir(base / "layers"))
        assert on_disk == known, (on_disk - known, known - on_disk)
        assert os.listdir(base / "tmp") == []
        assert set(os.listdir(base / "work")) <= known
        for (name,) in conn.execute("SELECT name FROM configs"):
            for ref in (cat.BASE, cat.CURRENT, cat.UPPER):
                assert cat.ref(conn, name, ref) in known
        return {f"{c}:{n}": layer for c, n, layer in conn.execute(
            "SELECT config, name, layer FROM refs WHERE name NOT LIKE '.%'")}
    finally:
        store.close()


def ovf_cmd(base: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "overlayfuse", "store", "--base", str(base), *args]


def test_sigkill_at_random_points_then_gc(tmp_path: Path) -> None:
    base = tmp_path / "store"
    src = tmp_path / "src"
    for i in range(40):
        d = src / f"d{i}"
        d.mkdir(parents=True)
        for j in range(40):
            (d / f"f{j}").write_text(f"{i}-{j}\n" * 20)
    subprocess.run(ovf_cmd(base, "init"), env=ENV, check=True)
    # probe once, unkilled: the cached verdicts make every later command quick
    subprocess.run(ovf_cmd(base, "run", "--writable", "--", "true"), env=ENV, check=True)
    # how long a command takes on this (possibly busy) machine, kept up to date below: the
    # kill falls anywhere from before the start to a bit after the usual end
    started = time.monotonic()
    subprocess.run(ovf_cmd(base, "run", "--writable", "--", "true"), env=ENV, check=True)
    typical = {"": time.monotonic() - started}
    steps = tmp_path / "steps"
    rng = random.Random(1234)
    finished: dict[str, str] = {}   # snapshot made by a command that exited 0 -> its marker
    kills = completed = 0
    runs = 50
    for i in range(runs):
        marker = f"m{i}"
        kind = rng.choice(["snapshot", "rollback", "init", "run", "build", "remove", "clean"])
        spared = i % 4 == 3          # every fourth runs to its end: some work must stick
        if spared and rng.random() < 0.5:
            kind = "snapshot"        # ... and leaves snapshots that must survive what follows
        snaps = [k.split(":", 1)[1] for k in finished if k.startswith("default:")]
        if kind == "snapshot":
            # a change and a snapshot in one command line: killed anywhere in between
            argv = ["sh", "-c", " && ".join([
                " ".join(ovf_cmd(base, "run", "--", "sh", "-c", f"'echo {marker} > marker'")),
                " ".join(ovf_cmd(base, "snapshot", marker))])]
        elif kind == "rollback" and snaps:
            argv = ovf_cmd(base, "rollback", rng.choice(snaps))
        elif kind == "init":
            argv = ovf_cmd(base, "--config", f"c{i}", "init", "--from", str(src))
        elif kind == "build":
            steps.write_text(f"echo {rng.randint(0, 3)} > b1\nseq 1000 > b2\n")
            argv = [sys.executable, "-m", "overlayfuse", "build", "--base", str(base),
                    "--config", "built", str(steps)]
        elif kind == "remove" and len(snaps) > 3:
            argv = ovf_cmd(base, "remove-snapshot", rng.choice(snaps))
        elif kind == "clean":
            argv = ovf_cmd(base, "clean")
        else:
            argv = ovf_cmd(base, "run", "--writable", "--", "sh", "-c", "seq 10000 > x")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        estimate = typical.get(kind, typical[""])
        if not spared:
            time.sleep(rng.uniform(0, 1.3 * estimate))
        if not spared and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
            typical[kind] = estimate * 1.15   # killed: aim a little later next time
        _out, err = proc.communicate(timeout=60)
        _wait_group_gone(proc.pid)   # the group's other processes die a moment later
        if kind == "remove":   # done or killed after its commit: no longer promised
            finished.pop(f"default:{argv[-1]}", None)
        if proc.returncode == 0:
            completed += 1
            typical[kind] = 0.5 * estimate + 0.5 * (time.monotonic() - t0)
            if kind == "snapshot":
                finished[f"default:{marker}"] = marker
        elif proc.returncode > 0:
            assert b"Traceback" not in err, err.decode()
        snapshots = check_consistent(base)
        for name in finished:
            assert name in snapshots, f"snapshot {name} made by a finished command is gone"
    for name, marker in finished.items():
        r = subprocess.run(ovf_cmd(base, "run", "--snapshot", name.split(":", 1)[1], "--",
                                   "cat", "marker"), env=ENV, capture_output=True, text=True)
        assert r.stdout == marker + "\n", (name, r.stderr)
    assert mounts_under(tmp_path) == []
    print(f"\nkill test: {runs} commands, {kills} killed, {completed} completed, "
          f"{len(finished)} snapshots checked")
    assert kills >= runs // 3 and completed >= runs // 4


def _wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still alive")


WORKER = r"""
import json, os, random, re, sys, time
import overlayfuse
from overlayfuse.errors import OverlayfuseError
from overlayfuse.store.build import build
base, wid, seconds, steps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(wid)
store = overlayfuse.LayerStore(base)
c = store.config("default")
counts, errors = {}, {}
report = os.fdopen(os.dup(1), "w")
log = os.open(steps + f"{wid}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log, 1)   # the commands' output and the store's messages go to the worker's log
os.dup2(log, 2)
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    i += 1
    op = rng.choice(["run", "throwaway", "snapshot", "rollback", "build", "remove", "clean",
                     "readonly"])
    try:
        if op == "run":
            c.run(["sh", "-c", f"echo {wid}-{i} > w{wid}; echo {wid}-{i} > shared"])
        elif op == "throwaway":
            c.run(["sh", "-c", "cat shared >/dev/null 2>&1; rm -f shared; echo t > t"],
                  writable=True)
        elif op == "readonly":
            snaps = c.snapshots()
            if snaps:
                rng.choice(snaps).run(["sh", "-c", "cat * >/dev/null 2>&1; true"])
        elif op == "snapshot":
            c.snapshot(f"s{wid}-{i}")
        elif op == "rollback":
            snaps = c.snapshots()
            if snaps:
                c.rollback(rng.choice(snaps).name)
        elif op == "remove":
            snaps = c.snapshots()
            if len(snaps) > 4:
                c.remove_snapshot(rng.choice(snaps).name)
        elif op == "clean":
            c.clean()
        elif op == "build":
            with open(steps + str(wid), "w") as f:
                f.write(f"echo {rng.randint(0, 2)} > b1\necho {rng.randint(0, 2)} > b2\n")
            build(store.config("built"), steps + str(wid))
        counts[op] = counts.get(op, 0) + 1
    except OverlayfuseError as e:
        key = op + ": " + re.sub(r"[0-9a-f]*[0-9][0-9a-f-]*", "N", str(e))
        errors[key] = errors.get(key, 0) + 1
print(json.dumps({"counts": counts, "errors": errors}), file=report)
"""

ALLOWED = ("is mounted writable", "is in use", "no snapshot", "exists already", "is gone",
           "a concurrent build replaced",
           "in use by")


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            st = os.lstat(p)
            h.update(f"{p} {st.st_mode} {st.st_size} {st.st_mtime_ns} {st.st_rdev}".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def test_eight_processes_at_once_never_corrupt_or_write_a_lower(tmp_path: Path) -> None:
    base = tmp_path / "store"
    store = LayerStore(str(base))
    store.config("default").init()
    store.config("built").init()
    store.close()
    seconds = 12.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(base), str(w), str(seconds),
                               str(tmp_path / "steps")], env=ENV, stdout=subprocess.PIPE,
                              text=True) for w in range(8)]
    seen: dict[str, str] = {}
    changed: list[str] = []
    checks = 0
    try:
        while any(p.poll() is None for p in procs):
            store = LayerStore(str(base))
            conn = store.db()
            writable = {u for (u,) in conn.execute(
                "SELECT u.layer FROM refs u JOIN refs c ON u.config=c.config "
                "WHERE u.name='.upper' AND c.name='.current' AND u.layer<>c.layer")}
            frozen = cat.layer_ids(conn) - writable
            store.close()
            for layer in frozen:
                try:
                    fp = _fingerprint(base / "layers" / layer)
                except FileNotFoundError:
                    continue
                if not (base / "layers" / layer).is_dir():
                    continue   # removed while we read it
                if seen.setdefault(layer, fp) != fp:
                    changed.append(layer)
            checks += 1
            time.sleep(0.1)
        outs = [p.communicate(timeout=120)[0] for p in procs]
        logs = "".join(Path(f"{tmp_path / 'steps'}{w}.log").read_text()[-2000:]
                       for w in range(8))
        assert all(outs), logs
        assert "Traceback" not in logs, logs
        results = [json.loads(out) for out in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert changed == [], f"frozen layers changed: {changed}"
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    bad = [k for k in errors if not any(a in k for a in ALLOWED)]
    assert bad == [], errors
    check_consistent(base)
    assert mounts_under(tmp_path) == []
    print(f"\nrace test: 8 processes, {sum(counts.values())} operations done {counts}, "
          f"{sum(errors.values())} refused {errors}, {len(seen)} frozen layers "
          f"fingerprinted over {checks} passes, none changed")
    assert sum(counts.values()) > 100


def test_a_command_outliving_its_killed_run_still_holds_the_upper(tmp_path: Path) -> None:
    base = tmp_path / "store"
    subprocess.run(ovf_cmd(base, "init"), env=ENV, check=True)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(ovf_cmd(base, "run", "--", "sh", "-c",
                                    f"echo a > a; touch {ready}; sleep 3; echo b > b"),
                            env=ENV, start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)                # only the store process, not its command
    proc.wait()
    r = subprocess.run(ovf_cmd(base, "snapshot", "s"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "in use by" in r.stderr, r.stderr
    _wait_group_gone(proc.pid)                       # the command finishes its work
    subprocess.run(ovf_cmd(base, "snapshot", "s"), env=ENV, check=True)
    r = subprocess.run(ovf_cmd(base, "run", "--", "cat", "a", "b"), env=ENV,
                       capture_output=True, text=True)
    assert r.stdout == "a\nb\n"
    check_consistent(base)
