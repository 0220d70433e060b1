"""However its mount ends, the overlayfuse daemon exits at once: mount/unmount cycles.

Each cycle mounts the FUSE daemon (without and with ``-o writeback=1``), runs a workload that
leaves the kernel something to do at the end (a process that stored through a shared mapping
and exited without msync; a process holding an fd, its cwd and a mapping in the mount, killed
before the unmount; for the endings that need no idle mount, processes reading, writing and
copying up while the end comes), then ends it one way: ``fusermount3 -u``, ``umount``,
``umount -l``, SIGTERM, SIGINT or a fusectl abort.  The daemon must be gone within
EXIT_WITHIN seconds with status 0, nothing may stay mounted, and what the workload wrote before
the end must be in the upper dir.

A fusectl abort cuts the connection: the daemon's read() answers ENODEV exactly as after an
unmount, so it ends its session and exits 0 (fuse-overlayfs does the same).  The kernel keeps
the mount, dead: every access answers ENOTCONN until it is unmounted, which libfuse leaves to
the admin (pyfuse3.close documents it) and ``overlayfuse umount`` does; the next
``overlayfuse mount`` there clears it by itself (test_crash.py).  That is what is asserted.

A stop signal that arrives right after the mount is made, before the daemon's event loop
runs, must unmount too: the daemon holds it back until its loop takes it.

And the harness: when a daemon outlives its unmount, tests/mounts.py says why (the FUSE
connection's state, the unmount taken, what holds the filesystem).
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import mounts
from mounts import (REPO, DaemonMount, LazyUnmountWarning, Layers, MountError,
                    abort_fuse_connection, force_unmount, mount_holders, mounts_at,
                    overlay_options, overlayfuse_argv, overlayfuse_mount, wait_gone)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="umount and fusectl need root"),
              pytest.mark.slow]

EXIT_WITHIN = 2.0  # seconds from the end of the mount to the daemon's exit
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
KINDS = ["fusermount3", "umount", "umount-l", "SIGTERM", "SIGINT", "abort"]
BIGS, BIG_SIZE = 24, 256 << 10  # lower files the busy workload copies up
MMAP_SIZE, MMAP_STORES = 4 << 20, 300

MMAP_WRITER = """
import mmap, os, random, sys
name, seed, size, stores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
m = mmap.mmap(fd, size)
os.close(fd)  # no flush after the stores: only the mapping's writeback carries them
for _ in range(stores):
    off = rng.randrange(0, size - 4096)
    m[off:off + 4096] = rng.randbytes(4096)
"""  # and exits with the mapping in place: the kernel unmaps it

FD_HOLDER = """
import mmap, os, sys, time
fd = os.open("held", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"held\\n" * 1000)
m = mmap.mmap(os.open("big0", os.O_RDONLY), 0, prot=mmap.PROT_READ)
print("ready", flush=True)
time.sleep(300)
"""

BUSY = """
import os, random, sys
seed, bigs = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
print("ready", flush=True)
try:
    while True:
        name = f"busy{seed}-{rng.randrange(8)}"
        with open(name, "ab") as f:
            f.write(rng.randbytes(1 << 16))
        with open(name, "rb") as f:
            f.read()
        with open(f"big{rng.randrange(bigs)}", "ab") as f:  # the first time: a copy-up
            f.write(b"x")
        if rng.random() < 0.1:
            os.truncate(name, 0)
except OSError:
    pass  # the mount ended under us
"""

# a stop signal right after the real mount, before the daemon's event loop runs
SIGNAL_AFTER_MOUNT = """
import os, sys
import pyfuse3
from overlayfuse.cli import main
real_init = pyfuse3.init
def init_then_signal(*args, **kwargs):
    real_init(*args, **kwargs)
    print("mounted: signalling", file=sys.stderr, flush=True)
    os.kill(os.getpid(), int(sys.argv[1]))
pyfuse3.init = init_then_signal
sys.exit(main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _mmap_expected(seed: int) -> bytes:
    """What MMAP_WRITER leaves in its file (the same generator, replayed)."""
    rng = random.Random(seed)
    data = bytearray(MMAP_SIZE)
    for _ in range(MMAP_STORES):
        off = rng.randrange(0, MMAP_SIZE - 4096)
        data[off:off + 4096] = rng.randbytes(4096)
    return bytes(data)


@contextmanager
def _children() -> Iterator[list[subprocess.Popen[str]]]:
    """Workload processes: killed and reaped however the cycle ends."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _start(procs: list[subprocess.Popen[str]], script: str, cwd: Path,
           *args: object) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=cwd,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def _ready(p: subprocess.Popen[str]) -> None:
    line = p.stdout.readline() if p.stdout else ""
    assert line == "ready\n", f"workload pid {p.pid} did not start (exit status {p.poll()})"


def load_mmap(dm: DaemonMount, procs: list[subprocess.Popen[str]], cycle: int) -> dict[str, bytes]:
    """A process stores through a shared mapping and exits: the kernel writes back at munmap."""
    name = f"mapped{cycle}"
    p = _start(procs, MMAP_WRITER, dm.mnt, name, cycle, MMAP_SIZE, MMAP_STORES)
    assert p.wait(60) == 0, "the mmap writer failed"
    return {name: _mmap_expected(cycle)}


def load_fd(dm: DaemonMount, procs: list[subprocess.Popen[str]], cycle: int) -> dict[str, bytes]:
    """A process with an fd, its cwd and a mapping in the mount (the harness must see all three)
    is killed before the end: the mount must then be as free as if it had never been used."""
    p = _start(procs, FD_HOLDER, dm.mnt)
    _ready(p)
    held = [h for h in mount_holders({dm.mount_id}, dm.device) if h.startswith(f"pid {p.pid} ")]
    assert len(held) == 1 and all(w in held[0] for w in ("cwd", "fd ", "maps ")), held
    p.kill()
    p.wait()
    return {"held": b"held\n" * 1000}


def load_busy(dm: DaemonMount, procs: list[subprocess.Popen[str]], cycle: int) -> dict[str, bytes]:
    """Readers, writers and copy-ups (a worker thread each) still going when the end comes."""
    for seed in range(3):
        _ready(_start(procs, BUSY, dm.mnt, seed, BIGS))
    time.sleep(0.3)
    assert all(p.poll() is None for p in procs), "a busy workload ended before the end came"
    return {}


WORKLOADS: dict[str, Callable[[DaemonMount, list[subprocess.Popen[str]], int],
                              dict[str, bytes]]] = {
    "mmap": load_mmap, "fd": load_fd, "busy": load_busy}


def _end(kind: str, dm: DaemonMount) -> None:
    """End the mount one way; returns once the kernel or the daemon has been told."""
    mnt = str(dm.mnt)
    argv = {"fusermount3": ["fusermount3", "-u", mnt], "umount": ["umount", mnt],
            "umount-l": ["umount", "-l", mnt]}.get(kind)
    if argv is not None:
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr.strip()}"
    elif kind in SIGNALS:
        os.kill(dm.pid, SIGNALS[kind])
    else:
        abort_fuse_connection(dm.device)


def _wait_exit(dm: DaemonMount, kind: str, what: str) -> int:
    """The daemon's exit status; fails saying why it still runs after EXIT_WITHIN."""
    deadline = time.monotonic() + EXIT_WITHIN
    while (rc := dm.proc.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if rc is None:
        pytest.fail(f"{what}: the daemon still runs {EXIT_WITHIN}s after the {kind}\n"
                    + mounts.why_daemon_lives(dm, None) + "\n" + dm.stderr(), pytrace=False)
    return rc


def _cycle(layers: Layers, kind: str, load: str, extra: list[str], cycle: int) -> None:
    what = f"cycle {cycle}: {load} workload, then {kind}"
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt, extra) as dm:
        with _children() as procs:
            expected = WORKLOADS[load](dm, procs, cycle)
            _end(kind, dm)
            rc = _wait_exit(dm, kind, what)
            assert rc == 0, f"{what}: daemon exit status {rc}\n{dm.stderr()}"
            if kind == "abort":
                with pytest.raises(OSError) as e:
                    os.statvfs(layers.mnt)
                assert e.value.errno == errno.ENOTCONN, f"{what}: the aborted mount: {e.value}"
        if kind == "abort":  # the workload is gone: nothing holds the dead mount any more
            r = subprocess.run([sys.executable, "-m", "overlayfuse", "umount", str(layers.mnt)],
                               capture_output=True, text=True, env=_env(), cwd=REPO)
            assert r.returncode == 0, f"{what}: overlayfuse umount: {r.stderr.strip()}"
        assert not mounts_at(layers.mnt), f"{what}: still mounted"
    for name, data in expected.items():
        assert (layers.upper / name).read_bytes() == data, f"{what}: {name} lost data"


@pytest.mark.parametrize("writeback", [False, True], ids=["", "writeback"])
@pytest.mark.parametrize("kind", KINDS)
def test_daemon_exits_when_its_mount_ends(layers: Layers, kind: str, writeback: bool) -> None:
    """Each workload, then the end: exit 0 within EXIT_WITHIN, nothing left mounted."""
    for i in range(BIGS):
        (layers.lowers[0] / f"big{i}").write_bytes(bytes([i]) * BIG_SIZE)
    # the umounts need an idle mount; the signals and the abort come in the middle of work
    loads = ["mmap", "fd"] + (["busy"] if kind in (*SIGNALS, "abort") else [])
    extra = ["writeback=1"] if writeback else []
    for cycle, load in enumerate(loads):
        _cycle(layers, kind, load, extra, cycle)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_signal_right_after_the_mount_unmounts(layers: Layers, sig: str) -> None:
    """A signal between the mount and the event loop's start (``overlayfuse mount`` has
    already returned to its caller then) still unmounts and exits 0, not killed by it with a
    dead mount left behind."""
    opts = overlay_options(layers.lowers, layers.upper, layers.work)
    argv = overlayfuse_argv(opts, layers.mnt)
    argv = [sys.executable, "-c", SIGNAL_AFTER_MOUNT, str(int(getattr(signal, sig))),
            *argv[argv.index("mount"):]]
    p = subprocess.Popen(argv, env=_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=mounts.READY_TIMEOUT + EXIT_WITHIN)
        assert "mounted: signalling" in err, f"the mount was never made: {err}"
        assert p.returncode == 0, f"{sig} right after the mount: exit status {p.returncode}\n{err}"
        assert not mounts_at(layers.mnt), f"{sig} right after the mount left it mounted"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(layers.mnt)


def test_harness_says_why_a_daemon_outlives_its_unmount(layers: Layers,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the mount in another mount namespace keeps the FUSE connection (fusermount3
    -u works, the daemon rightly keeps serving): the MountError must say so."""
    monkeypatch.setattr(mounts, "EXIT_TIMEOUT", 1.0)
    with _children() as procs:
        with pytest.raises(MountError) as e:
            with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt) as dm:
                ns = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                       "sh", "-c", "echo ready; exec sleep 300"],
                                      stdout=subprocess.PIPE, text=True)
                procs.append(ns)
                _ready(ns)
        text = str(e.value)
    assert f"daemon pid {dm.pid} did not exit" in text
    assert "unmount: fusermount3 -u: ok" in text and "LAZY" not in text, text
    assert "its FUSE connection is still alive" in text, text
    n = mounts.fuse_connection_number(dm.device)
    assert f"/sys/fs/fuse/connections/{n} exists" in text, text
    assert any(line.startswith("  held by: mount namespace mnt:[")
               and f"(pids {ns.pid} sleep) has it mounted at {layers.mnt} (mount id " in line
               for line in text.splitlines()), text
    assert wait_gone(dm.pid, 5)


def test_harness_reports_a_lazy_unmount_and_its_holder(layers: Layers,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with its cwd in the mount: fusermount3 -u and umount fail, ``umount -l``
    detaches it; that is warned about, and the daemon that then lives on is explained."""
    monkeypatch.setattr(mounts, "EXIT_TIMEOUT", 1.0)
    with _children() as procs:
        with pytest.warns(LazyUnmountWarning, match="needed a lazy unmount; held by: ") as warned:
            with pytest.raises(MountError) as e:
                with overlayfuse_mount(layers.lowers, layers.upper, layers.work,
                                       layers.mnt) as dm:
                    holder = subprocess.Popen(["sh", "-c", "echo ready; exec sleep 300"],
                                              cwd=layers.mnt, stdout=subprocess.PIPE, text=True)
                    procs.append(holder)
                    _ready(holder)
        text = str(e.value)
    assert any(f"pid {holder.pid} sleep: cwd" in str(w.message) for w in warned), warned.list
    assert "fusermount3 -u: failed (" in text and "busy" in text, text
    assert "umount -l: ok (LAZY: only detached)" in text, text
    assert "its FUSE connection is still alive" in text, text
    assert f"held by: pid {holder.pid} sleep: cwd" in text, text
    assert wait_gone(dm.pid, 5)
