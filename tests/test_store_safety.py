"""The store survives being killed at any point and being used by 8 processes at once.

Kill test: store commands (snapshot, rollback, init --from, run, build, remove-snapshot,
clean) are SIGKILLed after a random delay, over many runs; after each, ``gc`` must leave a
consistent store: every reference and build step names a layer that is in the catalog and on
disk, every layer dir on disk is in the catalog, tmp/ is empty, and every snapshot a command
finished making is still there with its content.

Race test: 8 processes loop over snapshots, rollbacks, runs (writable and throwaway) and
builds on one store while this process fingerprints every frozen layer again and again: a
layer that can serve as a lower must never change (contents, metadata, xattrs, its root), never
become a writable upper again, and the store must stay consistent.  What a build step or a run
leaves running dies with it (its PID namespace): it never writes a layer afterwards.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
from test_store_root import HOST_TOOLS, TOOL_BINDS
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
    """``store`` ARGS; a ``run``'s command sees the tree as / with the host's programs."""
    if "run" in args:
        at = args.index("run") + 1
        args = (*args[:at], *HOST_TOOLS, *args[at:])
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
    # commands until enough were killed and enough finished: how many kills land depends on
    # how far this machine's speed strays from the running estimate (a loaded machine once gave
    # 15 kills in 50), so the count of commands, not the coverage, gives way; bounded
    least, want_kills, want_completed, most = 50, 17, 12, 150
    i = -1
    while i + 1 < least or kills < want_kills or completed < want_completed:
        i += 1
        assert i < most, f"{most} commands gave only {kills} kills and {completed} completions"
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
                    *HOST_TOOLS, "--config", "built", str(steps)]
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
    print(f"\nkill test: {i + 1} commands, {kills} killed, {completed} completed, "
          f"{len(finished)} snapshots checked")


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
from overlayfuse.sandbox import Bind
from overlayfuse.store.build import build
base, wid, seconds, steps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
tools = [Bind.parse(b) for b in json.loads(sys.argv[5])]
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
            c.run(["sh", "-c", f"echo {wid}-{i} > w{wid}; echo {wid}-{i} > shared"],
                  binds=tools)
        elif op == "throwaway":
            c.run(["sh", "-c", "cat shared >/dev/null 2>&1; rm -f shared; echo t > t"],
                  writable=True, binds=tools)
        elif op == "readonly":
            snaps = c.snapshots()
            if snaps:
                rng.choice(snaps).run(["sh", "-c", "cat * >/dev/null 2>&1; true"],
                                      binds=tools)
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
            build(store.config("built"), steps + str(wid), binds=tools)
        counts[op] = counts.get(op, 0) + 1
    except OverlayfuseError as e:
        key = op + ": " + re.sub(r"[0-9a-f]*[0-9][0-9a-f-]*", "N", str(e))
        errors[key] = errors.get(key, 0) + 1
print(json.dumps({"counts": counts, "errors": errors}), file=report)
"""

ALLOWED = ("is mounted writable", "is in use", "no snapshot", "exists already", "is gone",
           "a concurrent build replaced",
           "in use by")


# What the store lets serve as a lower (``use.take`` stacks chains of these): a layer held by a
# snapshot or special reference other than ``.upper``, by a build step, or as a child's parent.
# A config's ``.upper`` that is not also its ``.current`` is its live upper (``reap`` keeps work
# dirs for exactly these); the store never lets one of those be held any other way.
FROZEN_SQL = ("SELECT id FROM layers WHERE id IN (SELECT layer FROM refs WHERE name<>'.upper')"
              " OR id IN (SELECT layer FROM steps)"
              " OR id IN (SELECT parent FROM layers WHERE parent IS NOT NULL)")
LIVE_UPPERS_SQL = ("SELECT u.layer FROM refs u JOIN refs c ON u.config=c.config"
                   " WHERE u.name='.upper' AND c.name='.current' AND u.layer<>c.layer")


def _catalog_view(base: Path) -> tuple[set[str], set[str]]:
    """(frozen layers, live uppers), both from ONE read transaction: two autocommit SELECTs are
    two snapshots, and a run allocating an upper between them made a fresh, still empty upper
    look frozen (then written by its run: a false "frozen layer changed")."""
    store = LayerStore(str(base))
    try:
        conn = store.db()
        conn.execute("BEGIN")      # deferred: the first SELECT fixes the snapshot for both
        try:
            frozen = {r[0] for r in conn.execute(FROZEN_SQL)}
            live = {r[0] for r in conn.execute(LIVE_UPPERS_SQL)}
        finally:
            conn.execute("COMMIT")
        return frozen, live
    finally:
        store.close()


def _fingerprint(root: Path) -> str:
    """All a lower shows through an overlay, the root dir included: names, types, modes,
    owners, sizes, mtimes, data, symlink targets, device numbers, every xattr (overlay markers
    too).  Not atime (reads move it) nor ctime (the store renames layer dirs).  An OSError means
    the layer went away (reaped) or an entry vanished: the caller tells which."""
    h = hashlib.sha256()

    def entry(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        h.update(b"%d:%s %o %d %d %d %d %d\n" % (len(rel), rel, st.st_mode, st.st_uid,
                                                   st.st_gid, st.st_size, st.st_mtime_ns,
                                                   st.st_rdev))
        for name in sorted(os.listxattr(path, follow_symlinks=False)):
            value = os.getxattr(path, name, follow_symlinks=False)
            h.update(b"x %r %d:%s\n" % (name.encode(), len(value), value))
        if stat.S_ISLNK(st.st_mode):
            h.update(b"-> %r\n" % os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            data = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                while chunk := os.read(fd, 1 << 20):
                    data.update(chunk)
            finally:
                os.close(fd)
            h.update(b"= %s\n" % data.hexdigest().encode())
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                entry(path + b"/" + name, rel + b"/" + name)

    entry(os.fsencode(root), b"")
    return h.hexdigest()


def test_eight_processes_at_once_never_corrupt_or_write_a_lower(tmp_path: Path) -> None:
    base = tmp_path / "store"
    store = LayerStore(str(base))
    store.config("default").init()
    store.config("built").init()
    store.close()
    seconds = 12.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(base), str(w), str(seconds),
                               str(tmp_path / "steps"), json.dumps(TOOL_BINDS)], env=ENV,
                              stdout=subprocess.PIPE,
                              text=True) for w in range(8)]
    seen: dict[str, str] = {}            # frozen layer -> its fingerprint when first seen
    changed: dict[str, str] = {}         # frozen layer -> how it changed
    unfrozen: set[str] = set()           # seen frozen, later a live upper
    checks = 0

    def check_frozen_layers() -> None:
        frozen, live = _catalog_view(base)
        unfrozen.update(live & (frozen | set(seen)))
        for layer in sorted(frozen):
            path = base / "layers" / layer
            try:
                fp = _fingerprint(path)
            except OSError as e:
                if not path.is_dir():
                    continue   # reaped (renamed away whole) while we read it
                if e.errno not in (errno.ENOENT, errno.ENODATA):
                    raise
                changed.setdefault(layer, f"{e.filename}: {e.strerror} while it was read")
                continue
            if seen.setdefault(layer, fp) != fp:
                changed.setdefault(layer, "fingerprint differs")

    try:
        while any(p.poll() is None for p in procs):
            check_frozen_layers()
            checks += 1
            time.sleep(0.1)
        check_frozen_layers()   # and once after the last operation of every worker
        checks += 1
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
    assert changed == {}, f"frozen layers changed: {changed}"
    assert unfrozen == set(), f"frozen layers became writable uppers: {unfrozen}"
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
    assert len(seen) > 10 and checks > 10


def _layers_fingerprint(base: Path) -> dict[str, str]:
    return {p.name: _fingerprint(p) for p in sorted((base / "layers").iterdir())}


def test_a_killed_run_takes_its_command_with_it(tmp_path: Path) -> None:
    """The command runs in the run's PID namespace: killing the store process kills it (it
    never outlives its run to write the upper after the upper was let go)."""
    base, flags = tmp_path / "store", tmp_path / "flags"
    flags.mkdir()
    subprocess.run(ovf_cmd(base, "init"), env=ENV, check=True)
    proc = subprocess.Popen(ovf_cmd(base, "run", "--bind", f"{flags}:/flags", "--", "sh", "-c",
                                    "echo a > a; touch /flags/ready; sleep 4; echo b > b; "
                                    "touch /flags/done"),
                            env=ENV, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (flags / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)                # only the store process, not its command
    proc.wait()
    _wait_group_gone(proc.pid)                       # the command went with it ...
    assert time.monotonic() - killed < 3, "the command outlived its killed run"
    subprocess.run(ovf_cmd(base, "snapshot", "s"), env=ENV, check=True)
    before = _layers_fingerprint(base)
    time.sleep(4.5)                                  # ... so nothing writes b afterwards
    assert not (flags / "done").exists()
    assert _layers_fingerprint(base) == before
    r = subprocess.run(ovf_cmd(base, "run", "--", "cat", "a", "b"), env=ENV,
                       capture_output=True, text=True)
    assert r.stdout == "a\n" and "b: No such file" in r.stderr, r.stderr
    check_consistent(base)


def test_a_build_steps_background_process_dies_with_the_step(tmp_path: Path) -> None:
    """A step's leftover process is killed when the step ends (its PID namespace): its late
    write never lands in any layer, and nothing writes a layer once it is frozen."""
    base = tmp_path / "store"
    steps = tmp_path / "steps"
    steps.write_text("echo a > a\n"
                     "echo b > b; (sleep 1; echo late > late) >/dev/null 2>&1 &\n")
    build = [sys.executable, "-m", "overlayfuse", "build", "--base", str(base), *HOST_TOOLS,
             "--config", "c", str(steps)]
    proc = subprocess.Popen(build, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        _wait_group_gone(proc.pid)    # the leftover writer is gone with the step
    assert proc.returncode == 0, err
    check_consistent(base)
    frozen = _layers_fingerprint(base)
    time.sleep(1.5)                   # past the leftover's write, had it lived
    assert _layers_fingerprint(base) == frozen
    written = sorted(p.name for p in (base / "layers").rglob("*") if p.name in ("b", "late"))
    assert written == ["b"], written
    store = LayerStore(str(base))
    try:
        assert store.db().execute("SELECT count(*) FROM steps").fetchone()[0] == 2
    finally:
        store.close()
    # a step that waits for what it starts keeps its work
    steps.write_text("echo a > a\necho b > b; (sleep 0.2; echo late > late) & wait\n")
    r = subprocess.run(build, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(ovf_cmd(base, "--config", "c", "run", "--", "cat", "a", "b", "late"),
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.stdout == "a\nb\nlate\n", r.stderr
    check_consistent(base)
    assert mounts_under(tmp_path) == []
