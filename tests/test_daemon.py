"""The daemon's life: background start that returns only once mounted, foreground mode, the
ways to stop it (umount, fusermount3 -u, SIGTERM/SIGINT) and a crash in the middle of a copy-up.

Each test finds the background daemon by the /dev/fuse descriptor it holds and its command
line, and always takes the mount down and the daemon out, also when the test fails.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import (REPO, Layers, force_unmount, is_mounted, kernel_overlay, mounts_at,
                    overlay_options, overlayfuse_pids, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon tests mount as root")

TIMEOUT = 20.0


def cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m overlayfuse ARGS``; output captured, so a daemon that kept the caller's
    stdout or stderr open would make this time out."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "overlayfuse", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(REPO),
                          stdin=subprocess.DEVNULL)


def holds_dev_fuse(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def daemon_pids(mnt: Path) -> list[int]:
    """overlayfuse processes serving *mnt*: the mount point in the command line, /dev/fuse open."""
    return [pid for pid in overlayfuse_pids(mnt) if holds_dev_fuse(pid)]


@contextlib.contextmanager
def cleanup(mnt: Path) -> Iterator[None]:
    """Whatever happens in the block: nothing stays mounted at *mnt*, no daemon survives."""
    try:
        yield
    finally:
        pids = daemon_pids(mnt)
        force_unmount(mnt)
        for pid in pids + daemon_pids(mnt):
            if not wait_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)


def opts(layers: Layers) -> str:
    return overlay_options(layers.lowers, layers.upper, layers.work)


def start_background(layers: Layers) -> int:
    """``overlayfuse mount`` without -f; checks it returned mounted; the daemon's PID."""
    (layers.lowers[0] / "hello").write_bytes(b"hello\n")
    r = cli("mount", "--backend", "fuse", "-o", opts(layers), str(layers.mnt))
    assert r.returncode == 0, r.stderr
    # mounted at the moment the command returns: no polling
    assert [m.fstype for m in mounts_at(layers.mnt)] == ["fuse.overlayfuse"]
    assert (layers.mnt / "hello").read_bytes() == b"hello\n"
    pids = daemon_pids(layers.mnt)
    assert len(pids) == 1, f"expected one daemon for {layers.mnt}, found {pids}"
    return pids[0]


# ------------------------------------------------------------------------------- background


def test_background_mount_then_overlayfuse_umount(layers: Layers) -> None:
    with cleanup(layers.mnt):
        pid = start_background(layers)
        assert os.getsid(pid) != os.getsid(0), "the daemon stayed in the caller's session"
        (layers.mnt / "new").write_bytes(b"new")
        r = cli("umount", str(layers.mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
        assert wait_gone(pid), f"daemon {pid} still running after umount"
    assert (layers.upper / "new").read_bytes() == b"new"


def test_root_mount_reads_ahead_a_mebibyte(layers: Layers) -> None:
    """The kernel's 128 KiB FUSE readahead is raised to 1 MiB once INIT is done (as root)."""
    with cleanup(layers.mnt):
        start_background(layers)
        st = os.stat(layers.mnt)
        knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        assert knob.read_text().strip() == "1024"
        assert cli("umount", str(layers.mnt)).returncode == 0


def test_background_mount_then_fusermount(layers: Layers) -> None:
    with cleanup(layers.mnt):
        pid = start_background(layers)
        r = subprocess.run(["fusermount3", "-u", str(layers.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
        assert wait_gone(pid), f"daemon {pid} still running after fusermount3 -u"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(layers: Layers, sig: signal.Signals) -> None:
    with cleanup(layers.mnt):
        pid = start_background(layers)
        with open(layers.mnt / "hello", "ab") as f:
            f.write(b"more\n")
        os.kill(pid, sig)
        assert wait_gone(pid), f"daemon {pid} ignored {sig.name}"
        assert not is_mounted(layers.mnt), f"{sig.name} left the mount behind"
    assert (layers.upper / "hello").read_bytes() == b"hello\nmore\n"


def test_foreground_stays_and_exits_zero_on_unmount(layers: Layers) -> None:
    (layers.lowers[0] / "hello").write_bytes(b"hello\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with cleanup(layers.mnt):
        proc = subprocess.Popen([sys.executable, "-m", "overlayfuse", "mount", "--backend",
                                 "fuse", "-f", "-o", opts(layers), str(layers.mnt)],
                                env=env, cwd=str(REPO), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not is_mounted(layers.mnt):
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "no mount"
                time.sleep(0.02)
            assert (layers.mnt / "hello").read_bytes() == b"hello\n"
            time.sleep(0.3)
            assert proc.poll() is None, "-f returned while mounted"
            assert holds_dev_fuse(proc.pid), "the -f process is not the one serving"
            assert daemon_pids(layers.mnt) == [proc.pid], "-f forked another daemon"
            r = cli("umount", str(layers.mnt))
            assert r.returncode == 0, r.stderr
            assert proc.wait(10) == 0
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert "Traceback" not in err, err
        finally:
            if proc.poll() is None:
                force_unmount(layers.mnt)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for s in (proc.stdout, proc.stderr):
                if s:
                    s.close()


# ------------------------------------------------------------------------------- crash


MIB = 1 << 20
BIG_MIB = 256


def _big_block(i: int) -> bytes:
    return (b"%08d" % i) * (MIB // 8)


# the first MiB after the writer's one-byte write at offset 0 (the new state)
NEW_FIRST = b"X" + _big_block(0)[1:]


def _check_big(path: Path, new: bool = False) -> None:
    """The file is exactly the lower's content (each MiB stamped with its number), byte for
    byte; with *new*, or that content with the writer's X at offset 0."""
    assert os.stat(path).st_size == BIG_MIB * MIB
    with open(path, "rb") as f:
        first = f.read(MIB)
        assert first == _big_block(0) or new and first == NEW_FIRST, f"{path}: MiB 0 differs"
        for i in range(1, BIG_MIB):
            assert f.read(MIB) == _big_block(i), f"{path}: MiB {i} differs"
        assert f.read(1) == b""


def test_sigkill_during_copy_up_leaves_old_or_new_state(layers: Layers) -> None:
    """SIGKILL while a large file is being copied up: the upper has no half-written file (the
    partial copy lives in the work dir only), and the next mount (ours, and the kernel's)
    shows the lower data intact."""
    big = layers.lowers[0] / "big"
    with open(big, "wb") as f:
        for i in range(BIG_MIB):
            f.write(_big_block(i))
    workdir_files = []
    with cleanup(layers.mnt):
        pid = start_background(layers)
        writer = subprocess.Popen([sys.executable, "-c",
                                   "import sys; f = open(sys.argv[1], 'r+b'); f.write(b'X');"
                                   "f.close()", str(layers.mnt / "big")],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not workdir_files:
                for d, _, files in os.walk(layers.work):
                    workdir_files += [Path(d) / n for n in files
                                      if (Path(d) / n).stat().st_size > 0]
                if writer.poll() is not None or time.monotonic() > deadline:
                    break
            os.kill(pid, signal.SIGKILL)
            assert wait_gone(pid)
        finally:
            force_unmount(layers.mnt)
            writer.wait(10)
    assert workdir_files, "the copy-up finished before a temp file was seen in work/"
    assert writer.returncode != 0, "the write succeeded although the daemon was killed"
    # the upper: the old state (nothing) or the new one (a complete copy), never a partial file
    _check_big(big)  # the lower itself is never written
    up = layers.upper / "big"
    copied = up.exists()
    if copied:
        _check_big(up, new=True)
    with cleanup(layers.mnt):
        start_background(layers)
        _check_big(layers.mnt / "big", new=copied)
        r = cli("umount", str(layers.mnt))
        assert r.returncode == 0, r.stderr
    if not up.exists():
        work2 = layers.root / "work2"
        work2.mkdir()
        with kernel_overlay(layers.lowers, layers.upper, work2, layers.mnt):
            _check_big(layers.mnt / "big")
            assert sorted(os.listdir(layers.mnt)) == ["big", "hello"]


TIED_MOUNT = """
import os, signal, sys
from overlayfuse.fusefs.daemon import mount_fuse
from overlayfuse.spec import OverlaySpec
lower, upper, work, mnt = sys.argv[1:]
pid = mount_fuse(OverlaySpec(lowerdirs=(lower,), upperdir=upper, workdir=work), mnt,
                 with_caller=True)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as a prober killed in the middle of its trial
"""


def test_mount_tied_to_its_caller_goes_when_the_caller_is_killed(layers: Layers) -> None:
    """A trial mount (probe) must not outlive the process that made it, however it ends."""
    (layers.lowers[0] / "hello").write_bytes(b"hello\n")
    with cleanup(layers.mnt):
        r = subprocess.run([sys.executable, "-c", TIED_MOUNT, str(layers.lowers[0]),
                            str(layers.upper), str(layers.work), str(layers.mnt)],
                           capture_output=True, text=True, timeout=TIMEOUT, cwd=str(REPO),
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == -signal.SIGKILL, r.stderr
        daemon = int(r.stdout.split()[0])
        assert wait_gone(daemon, 10), "the daemon outlived the process its mount belongs to"
        assert not is_mounted(layers.mnt)
        assert (layers.lowers[0] / "hello").read_bytes() == b"hello\n"
