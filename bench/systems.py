"""The systems under test and how each one is mounted, measured and always unmounted.

``kernel`` (overlayfs via mount(8)), ``overlayfuse`` (our FUSE daemon, run in the foreground so
this process owns its PID), ``fuse-overlayfs`` and ``raw`` (the merged content in a plain
directory: the floor). Every mount is a context manager whose exit unmounts with escalation
(fusermount3 -u, umount, umount -l, then SIGTERM/SIGKILL for a daemon), so a failure or Ctrl-C
never leaves a mount behind. A watchdog kills a hung daemon so a stuck workload fails instead of
blocking the run forever.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from overlayfuse.sysmount.fsinfo import mount_table

if TYPE_CHECKING:
    from bench.asuser import User

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
# mount(8) passes options through one page; longer lowerdir lists use paths relative to the cwd
MOUNT_DATA_LIMIT = 3500


class MountFailed(Exception):
    """A system could not be mounted (the reason and the daemon's stderr tail)."""


@dataclass
class Mounted:
    """A mounted system: where the merged tree is, and the daemon's PID for FUSE systems."""

    root: Path
    pid: int | None = None


# ---------------------------------------------------------------------------------------------
# /proc helpers


def mountpoints() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount in this namespace."""
    return [(entry.mountpoint, entry.fstype) for entry in mount_table()]


def mounts_at(path: Path | str) -> list[str]:
    """Fstypes mounted exactly at *path*, innermost last."""
    p = os.path.realpath(path)
    return [t for m, t in mountpoints() if m == p]


def mounts_under(root: Path | str) -> list[str]:
    """Mount points at or below *root*."""
    r = os.path.realpath(root).rstrip("/")
    return [m for m, _ in mountpoints() if m == r or m.startswith(r + "/")]


def force_unmount(path: Path | str) -> bool:
    """Unmount everything at *path*; True when nothing is mounted there any more."""
    p = os.path.realpath(path)
    for _ in range(6):
        types = mounts_at(p)
        if not types:
            return True
        argvs = ([["fusermount3", "-u", p]] if types[-1].startswith("fuse") else []) + \
            [["umount", p], ["umount", "-l", p]]
        for argv in argvs:
            if subprocess.run(argv, capture_output=True).returncode == 0:
                break
    return not mounts_at(p)


def daemon_cpu(pid: int | None) -> float | None:
    """User+system CPU seconds of *pid* (all threads), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rpartition(")")[2].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def daemon_hwm_kb(pid: int | None) -> int | None:
    """Peak resident set (VmHWM, KiB) of *pid*, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _holds_dev_fuse(pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    return True
    except OSError:
        pass
    return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(d))
    return out


def server_pid(pid: int) -> int:
    """The process that serves /dev/fuse: *pid* itself, else one of its descendants."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        if _holds_dev_fuse(p):
            return p
        todo += _children(p)
    return pid


def drop_caches() -> None:
    """sync, then drop the page cache, dentries and inodes (root only; otherwise only sync)."""
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


# ---------------------------------------------------------------------------------------------
# the systems


def _esc(p: str) -> str:
    return p.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_opts(lowers: Sequence[Path | str], upper: Path, work: Path) -> str:
    return (f"lowerdir={':'.join(_esc(str(p)) for p in lowers)},"
            f"upperdir={_esc(str(upper))},workdir={_esc(str(work))}")


class System:
    """One way of presenting the merged tree; ``mount`` yields a :class:`Mounted`."""

    name = ""
    is_fuse = False
    default = True  # run when --systems is not given

    def environ(self) -> dict[str, str]:
        """Extra environment for a daemon of this system."""
        return {}

    def available(self) -> str | None:
        """None when usable here, else why not."""
        return None

    def mount(self, lowers: list[Path], merged: Path, rundir: Path, mutating: bool,
              timeout: float, user: "User | None" = None
              ) -> contextlib.AbstractContextManager[Mounted]:
        """Mount on ``rundir/mnt`` (upper and work beside it); with ``user``, for that user:
        a FUSE daemon runs as the user, and the upper belongs to it."""
        raise NotImplementedError


class Raw(System):
    """The merged content in a plain directory: what the storage alone costs."""

    name = "raw"

    @contextlib.contextmanager
    def mount(self, lowers: list[Path], merged: Path, rundir: Path, mutating: bool,
              timeout: float, user: "User | None" = None) -> Iterator[Mounted]:
        if user is not None:
            raise MountFailed("raw is not measured in --as-user runs")
        if not mutating:
            yield Mounted(merged)
            return
        # a private real copy (not links: writes must not reach the cached layers)
        dst = rundir / "raw"
        r = subprocess.run(["cp", "-a", f"{merged}", str(dst)], capture_output=True, text=True)
        if r.returncode != 0:
            raise MountFailed(f"cp -a {merged}: {r.stderr.strip()}")
        yield Mounted(dst)


class Kernel(System):
    """The kernel's overlayfs with its default options."""

    name = "kernel"

    def available(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root"
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True)
        return None

    @contextlib.contextmanager
    def mount(self, lowers: list[Path], merged: Path, rundir: Path, mutating: bool,
              timeout: float, user: "User | None" = None) -> Iterator[Mounted]:
        upper, work, mnt = rundir / "upper", rundir / "work", rundir / "mnt"
        if user is not None:
            user.give(upper)  # the merged root is the upper's: the user may write there
        cwd = None
        opts = overlay_opts(lowers, upper, work)
        if len(opts) > MOUNT_DATA_LIMIT:
            cwd = os.path.commonpath([str(p) for p in lowers])
            opts = overlay_opts([os.path.relpath(p, cwd) for p in lowers], upper, work)
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                           cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            raise MountFailed(f"mount -t overlay: {r.stderr.strip()}")
        try:
            yield Mounted(mnt)
        finally:
            if not force_unmount(mnt):
                log.error("could not unmount the kernel overlay at %s", mnt)


class _Daemon(System):
    """A FUSE daemon run in the foreground under Popen: we own its PID and its stderr."""

    is_fuse = True

    def argv(self, opts: str, mnt: Path) -> list[str]:
        raise NotImplementedError

    def available(self) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if not shutil.which("fusermount3"):
            return "no fusermount3"
        return None

    @contextlib.contextmanager
    def mount(self, lowers: list[Path], merged: Path, rundir: Path, mutating: bool,
              timeout: float, user: "User | None" = None) -> Iterator[Mounted]:
        upper, work, mnt = rundir / "upper", rundir / "work", rundir / "mnt"
        logfile = rundir / f"{self.name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(self.environ())
        argv = self.argv(overlay_opts(lowers, upper, work), mnt)
        if user is not None:
            user.give(upper, work, mnt)
            argv = user.argv() + argv  # mounted through fusermount3, as the user would
        with open(logfile, "wb") as lf:
            proc = subprocess.Popen(argv,
                                    stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env,
                                    cwd=REPO, start_new_session=True)
        watchdog: threading.Timer | None = None
        try:
            self._wait_ready(proc, mnt, logfile)
            pid = server_pid(proc.pid)
            watchdog = threading.Timer(timeout, self._kill_hung, (proc, pid, mnt))
            watchdog.daemon = True
            watchdog.start()
            try:
                yield Mounted(mnt, pid)
            except Exception as e:
                # what the daemon said is the useful part of a failure: keep it in the record
                state = "running" if proc.poll() is None else f"exited {proc.returncode}"
                e.add_note(f"daemon {state}; stderr: {_tail(logfile, 600)}")
                raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            was_mounted = bool(mounts_at(mnt))
            gone = force_unmount(mnt)
            # interrupted before the mount appeared: no unmount will end the daemon, a signal will
            self._stop(proc, patient=was_mounted)
            if mounts_at(mnt):  # it mounted after all while we were stopping it
                gone = force_unmount(mnt)
            if not gone:
                log.error("could not unmount %s at %s", self.name, mnt)

    def _wait_ready(self, proc: subprocess.Popen[bytes], mnt: Path, logfile: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not mounts_at(mnt):
            if proc.poll() is not None and not mounts_at(mnt):
                raise MountFailed(f"{self.name} exited with status {proc.returncode} before "
                                  f"mounting: {_tail(logfile)}")
            if time.monotonic() > deadline:
                raise MountFailed(f"{self.name} did not mount within {READY_TIMEOUT:.0f}s: "
                                  f"{_tail(logfile)}")
            time.sleep(0.01)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], patient: bool = True) -> None:
        """Wait for the daemon to exit after its unmount; escalate to SIGTERM, SIGKILL."""
        for sig in ((None,) if patient else ()) + (signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                proc.wait(10 if sig is None else 5)
                return
            except subprocess.TimeoutExpired:
                log.warning("daemon %d still running after unmount (%s)", proc.pid, sig)

    def _kill_hung(self, proc: subprocess.Popen[bytes], pid: int, mnt: Path) -> None:
        """Watchdog: a workload ran past its time; kill the daemon so blocked calls fail."""
        log.error("%s: workload timed out, killing daemon %d", self.name, pid)
        for p in {pid, proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _tail(logfile: Path, limit: int = 1500) -> str:
    try:
        text = logfile.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return (text[-limit:] if text else "(empty stderr)").replace("\n", " | ")


class FuseOverlayfs(_Daemon):
    """fuse-overlayfs, the C FUSE implementation we compare against."""

    name = "fuse-overlayfs"

    def available(self) -> str | None:
        if not os.path.exists(FUSE_OVERLAYFS):
            return "fuse-overlayfs not installed"
        return super().available()

    def argv(self, opts: str, mnt: Path) -> list[str]:
        return [FUSE_OVERLAYFS, "-f", "-o", opts, str(mnt)]


class Overlayfuse(_Daemon):
    """Our pyfuse3 daemon (``python -m overlayfuse mount --backend fuse -f``).

    ``$OVERLAYFUSE_BENCH_CMD`` replaces the command before ``-o OPTS MNT`` (to compare another
    checkout, interpreter or option set); it must stay in the foreground.
    """

    name = "overlayfuse"
    ENV = "OVERLAYFUSE_BENCH_CMD"

    def available(self) -> str | None:
        if not os.environ.get(self.ENV) and not (REPO / "overlayfuse" / "cli.py").exists():
            return "overlayfuse/cli.py missing"
        return super().available()

    def argv(self, opts: str, mnt: Path) -> list[str]:
        cmd = shlex.split(os.environ.get(self.ENV, "")) or [
            sys.executable, "-m", "overlayfuse", "mount", "--backend", "fuse", "-f"]
        return [*cmd, "-o", opts, str(mnt)]


class OverlayfuseClassic(Overlayfuse):
    """overlayfuse with classic opens and listings (no zero-message mode) on the patched
    binding: the lever, measured side by side.  Run only when named in --systems."""

    name = "overlayfuse-classic"
    default = False

    def environ(self) -> dict[str, str]:
        return {"OVERLAYFUSE_OPENS": "classic"}


class OverlayfuseZero(Overlayfuse):
    """overlayfuse with zero-message file opens too (``-o zero_opens``)."""

    name = "overlayfuse-zero"
    default = False

    def environ(self) -> dict[str, str]:
        return {"OVERLAYFUSE_OPENS": "zero"}


class OverlayfuseWriteback(Overlayfuse):
    """overlayfuse with the kernel's writeback cache (``-o writeback=1``): small writes
    reach the daemon as pages.  Run only when named in --systems."""

    name = "overlayfuse-writeback"
    default = False

    def environ(self) -> dict[str, str]:
        return {"OVERLAYFUSE_WRITEBACK": "1"}


class OverlayfuseNospin(Overlayfuse):
    """overlayfuse whose idle loop sleeps at once (``-o spin=0``): the spin lever, measured
    side by side.  Run only when named in --systems."""

    name = "overlayfuse-nospin"
    default = False

    def argv(self, opts: str, mnt: Path) -> list[str]:
        return super().argv(f"{opts},spin=0", mnt)


class OverlayfuseAuto(Overlayfuse):
    """overlayfuse with plain READDIR where the kernel won't use the attributes
    (``-o readdirplus_auto``).  Run only when named in --systems."""

    name = "overlayfuse-auto"
    default = False

    def argv(self, opts: str, mnt: Path) -> list[str]:
        return super().argv(f"{opts},readdirplus_auto", mnt)


class OverlayfuseB(Overlayfuse):
    """A second overlayfuse beside the first, for a before/after in one run: the command in
    ``$OVERLAYFUSE_BENCH_CMD_B`` (e.g. the same checkout with another pyfuse3 on PYTHONPATH).
    Run only when named in --systems."""

    name = "overlayfuse-b"
    default = False
    ENV = "OVERLAYFUSE_BENCH_CMD_B"

    def available(self) -> str | None:
        return super().available() if os.environ.get(self.ENV) else f"${self.ENV} not set"


ALL: dict[str, System] = {s.name: s for s in (Kernel(), FuseOverlayfs(), Overlayfuse(),
                                               OverlayfuseClassic(), OverlayfuseZero(),
                                               OverlayfuseWriteback(), OverlayfuseNospin(),
                                               OverlayfuseAuto(),
                                               OverlayfuseB(),
                                               Raw())}
REFERENCES = ("kernel", "fuse-overlayfs")
