"""Real mounts for tests: kernel overlays, overlayfuse and fuse-overlayfs daemons, tree snapshots.

Every context manager here unmounts on exit, also when the test body raised: a mount left
behind breaks every later test and the developer's machine, so cleanup escalates (fusermount3,
then umount, then a lazy umount, then SIGTERM and SIGKILL for the daemon) instead of giving up,
but never silently: a lazy unmount is warned about, and a daemon that outlives its unmount fails
with why (its FUSE connection's state, the unmount it took, what still holds the filesystem).
Daemons write their stderr to a log file next to the mount point; its tail is attached to any
failure.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlayfuse.sysmount.fsinfo import unescape_mountinfo

if TYPE_CHECKING:  # pragma: no cover
    from unpriv import Unprivileged

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0
# xattr namespaces private to an overlay: never user-visible through a merged tree
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.",
                          "trusted.fuseoverlayfs.")


class MountError(Exception):
    """A mount did not come up, or did not go away cleanly."""


# ---------------------------------------------------------------------------------------------
# layers


@dataclass
class Layers:
    """The directories of one overlay: lowers (top first), upper, work and the mount point."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path


def make_layers(base: Path, n_lowers: int = 2) -> Layers:
    """Create empty ``lower0..lowerN-1``, ``upper``, ``work`` and ``mnt`` under *base*."""
    base = Path(base)
    layers = Layers(base, [base / f"lower{i}" for i in range(n_lowers)],
                    base / "upper", base / "work", base / "mnt")
    for d in (*layers.lowers, layers.upper, layers.work, layers.mnt):
        d.mkdir(parents=True, exist_ok=True)
    return layers


# ---------------------------------------------------------------------------------------------
# /proc/self/mountinfo


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the parts tests care about."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str
    device: str = ""  # "major:minor" of the filesystem (st_dev of the mount's files)


def mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """Parse /proc/PID/mountinfo (mount points unescaped): the mounts of that process's mount
    namespace (ours by default)."""
    entries = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            entries.append(MountEntry(int(lf[0]), unescape_mountinfo(lf[4]), rf[0],
                                      unescape_mountinfo(rf[1]) if len(rf) > 1 else "",
                                      rf[2] if len(rf) > 2 else "", lf[2]))
    return entries


def mounts_at(path: os.PathLike[str] | str) -> list[MountEntry]:
    """Mounts whose mount point is exactly *path* (resolved), innermost last."""
    real = os.path.realpath(path)
    return [m for m in mountinfo() if m.mountpoint == real]


def mounts_under(root: os.PathLike[str] | str) -> list[MountEntry]:
    """Mounts at or below *root* (resolved)."""
    real = os.path.realpath(root).rstrip("/")
    return [m for m in mountinfo() if m.mountpoint == real or m.mountpoint.startswith(real + "/")]


def is_mounted(path: os.PathLike[str] | str) -> bool:
    return bool(mounts_at(path))


class LazyUnmountWarning(UserWarning):
    """A mount had to be detached with ``umount -l``: something still held it, and its
    filesystem (a FUSE daemon's session) lives on until that lets go."""


@dataclass
class UnmountResult:
    """What :func:`unmount` did at a mount point: each command it ran and how that ended."""

    path: str
    steps: list[str] = field(default_factory=list)
    lazy: bool = False  # detached by umount -l: the filesystem outlives it while anything holds it
    ok: bool = False  # nothing is mounted at the path afterwards

    def summary(self) -> str:
        return "; ".join(self.steps) if self.steps else "nothing was mounted there"


def _run_step(argv: list[str], user: "Unprivileged | None" = None) -> tuple[bool, str]:
    r = (user.run(argv, capture_output=True, text=True) if user is not None
         else subprocess.run(argv, capture_output=True, text=True))
    if r.returncode == 0:
        return True, f"{' '.join(argv[:-1])}: ok"
    why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return False, f"{' '.join(argv[:-1])}: failed ({why})"


def unmount(path: os.PathLike[str] | str, user: "Unprivileged | None" = None) -> UnmountResult:
    """Unmount everything at *path*: fusermount3 -u (as *user* if given), else umount, else
    ``umount -l``; says which it took.  A lazy unmount also names what held the mount (it
    keeps the filesystem alive), is logged and raises a :class:`LazyUnmountWarning`."""
    p = os.path.realpath(path)
    result = UnmountResult(p)
    lazy_notes = []
    for _ in range(8):
        here = mounts_at(p)
        if not here:
            break
        top = here[-1]
        done = False
        if top.fstype.startswith("fuse"):
            done, step = _run_step(["fusermount3", "-u", p], user)
            result.steps.append(step)
        if not done:
            done, step = _run_step(["umount", p])
            result.steps.append(step)
        if not done:
            holders = mount_holders({top.mount_id}, top.device)
            done, step = _run_step(["umount", "-l", p])
            result.steps.append(step)
            if done:
                result.lazy = True
                lazy_notes.append(f"{p} ({top.fstype}, device {top.device}) needed a lazy "
                                  "unmount; held by: "
                                  + ("; ".join(holders) or "nothing found (gone since?)"))
    result.ok = not mounts_at(p)
    for note in lazy_notes:  # last: a warning turned into an error must not stop the cleanup
        log.warning("%s", note)
        warnings.warn(note, LazyUnmountWarning, stacklevel=2)
    return result


def force_unmount(path: os.PathLike[str] | str, user: "Unprivileged | None" = None) -> bool:
    """Unmount everything at *path* (see :func:`unmount`); True when nothing is mounted there
    afterwards."""
    return unmount(path, user).ok


def _hexdev(device: str) -> str:
    """mountinfo's decimal ``major:minor`` as /proc/PID/maps writes it (hex, two digits)."""
    major, minor = (int(x) for x in device.split(":"))
    return f"{major:02x}:{minor:02x}"


def _fd_mount_id(fdinfo: str) -> int | None:
    try:
        with open(fdinfo) as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _path_mount_id(link: str) -> int | None:
    """The mount ID of a /proc magic link's target (cwd, root): opened O_PATH, which asks
    the filesystem nothing, so a hung FUSE daemon cannot hang the scan."""
    try:
        fd = os.open(link, os.O_PATH)
    except OSError:
        return None
    try:
        return _fd_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def mount_holders(mount_ids: Collection[int], device: str) -> list[str]:
    """What keeps a filesystem alive: other mount namespaces that have it mounted (*device*,
    ``major:minor``), and processes with an fd, cwd, root or mapping in it (one of
    *mount_ids*, or its mounts in those namespaces).  Reads only /proc, never the mount."""
    ids = set(mount_ids)
    me = os.readlink("/proc/self/ns/mnt")
    namespaces: dict[str, list[str]] = {}
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            namespaces.setdefault(os.readlink(f"/proc/{pid}/ns/mnt"), []).append(pid)
        except OSError:
            continue
    out = []
    for ns, pids in sorted(namespaces.items()):
        there = None
        for pid in pids:  # the first that has not exited meanwhile
            with contextlib.suppress(OSError):
                there = [m for m in mountinfo(pid) if device and m.device == device]
                break
        if not there:
            continue
        ids.update(m.mount_id for m in there)
        where = ", ".join(f"{m.mountpoint} (mount id {m.mount_id})" for m in there)
        if ns == me:
            others = [m for m in there if m.mount_id not in mount_ids]  # bind mounts, say
            if others:
                out.append("this mount namespace also has it mounted at " + ", ".join(
                    f"{m.mountpoint} (mount id {m.mount_id})" for m in others))
        else:
            who = ", ".join(f"{p} {_comm(p)}" for p in pids[:4])
            out.append(f"mount namespace {ns} (pids {who}{' ...' if len(pids) > 4 else ''}) "
                       f"has it mounted at {where}")
    hexdev = _hexdev(device) if device else None
    for pid in sorted((p for ps in namespaces.values() for p in ps), key=int):
        what = []
        for kind in ("cwd", "root"):
            if _path_mount_id(f"/proc/{pid}/{kind}") in ids:
                what.append(kind)
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            fds = []
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if _fd_mount_id(f"/proc/{pid}/fdinfo/{fd}") in ids:
                    what.append(f"fd {fd} -> {target}")
                elif target.startswith("mnt:[") and target not in namespaces:
                    # a namespace kept by an fd alone: its mounts cannot be listed from here
                    what.append(f"fd {fd} -> {target}, a mount namespace without processes")
        if hexdev:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
                mapped = {ln.split(None, 5)[-1].strip() for ln in f
                          if ln.split(None, 4)[3:4] == [hexdev]}
                what += [f"maps {m}" for m in sorted(mapped)]
        if what:
            me_too = " (this test process)" if int(pid) == os.getpid() else ""
            out.append(f"pid {pid} {_comm(pid)}{me_too}: " + ", ".join(what[:6])
                       + (" ..." if len(what) > 6 else ""))
    return out


FUSECTL = "/sys/fs/fuse/connections"


def fuse_connection_state(device: str) -> str:
    """Whether the kernel still has the FUSE connection of *device* (``major:minor``):
    fusectl's ``/sys/fs/fuse/connections/N`` (N: the device number; fusectl is mounted in a
    throwaway mount namespace when it is not mounted here) and the filesystem's bdi."""
    conn = f"{FUSECTL}/{fuse_connection_number(device)}"
    bdi = f"/sys/class/bdi/{device} " + ("exists" if os.path.exists(f"/sys/class/bdi/{device}")
                                          else "is gone")
    if any(m.fstype == "fusectl" and m.mountpoint == FUSECTL for m in mountinfo()):
        try:
            waiting = Path(conn, "waiting").read_text().strip()
            return f"{conn} exists ({waiting} requests waiting); {bdi}"
        except OSError:
            return f"{conn} is gone; {bdi}"
    script = (f"mount -t fusectl fusectl {FUSECTL} || exit 2; "
              f"cat {conn}/waiting 2>/dev/null || echo gone")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            script], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{conn}: unknown ({e}); {bdi}"
    if r.returncode != 0:
        return f"{conn}: unknown (fusectl: {r.stderr.strip()}); {bdi}"
    state = r.stdout.strip()
    return (f"{conn} is gone; {bdi}" if state == "gone"
            else f"{conn} exists ({state} requests waiting); {bdi}")


def fuse_connection_number(device: str) -> int:
    """The name of a FUSE connection under /sys/fs/fuse/connections: the kernel's dev_t of its
    filesystem (``major:minor`` as in mountinfo)."""
    major, minor = (int(x) for x in device.split(":"))
    return (major << 20) | minor


def abort_fuse_connection(device: str) -> None:
    """``echo 1 > /sys/fs/fuse/connections/N/abort`` for the filesystem *device*; where fusectl
    is not mounted, it is mounted for this in a throwaway mount namespace."""
    conn = f"{FUSECTL}/{fuse_connection_number(device)}/abort"
    if any(m.fstype == "fusectl" and m.mountpoint == FUSECTL for m in mountinfo()):
        Path(conn).write_text("1")
        return
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t fusectl fusectl {FUSECTL} && echo 1 > {conn}"],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise MountError(f"cannot abort the FUSE connection {conn}: {r.stderr.strip()}")


def _wait_ready(mnt: str, before: int, proc: subprocess.Popen[bytes], logfile: Path,
                what: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until a new mount shows up at *mnt*; fail with the daemon's stderr if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if len(mounts_at(mnt)) > before:
            return
        rc = proc.poll()
        if rc is not None:
            # the daemon may have mounted and exited at the same moment: look once more
            if len(mounts_at(mnt)) > before:
                return
            raise MountError(f"{what} exited with status {rc} before mounting {mnt}:\n"
                             f"{_tail(logfile)}")
        if time.monotonic() > deadline:
            raise MountError(f"{what} did not mount {mnt} within {timeout:.0f}s:\n{_tail(logfile)}")
        time.sleep(0.02)


def _tail(logfile: Path, limit: int = 6000) -> str:
    try:
        text = logfile.read_text(errors="replace")
    except OSError as e:
        return f"(no daemon log: {e})"
    text = text if len(text) <= limit else "...\n" + text[-limit:]
    return f"--- daemon stderr ({logfile}) ---\n{text.rstrip()}\n--- end ---" if text.strip() \
        else f"(daemon stderr {logfile} is empty)"


def _stop(proc: subprocess.Popen[bytes], timeout: float | None = None,
          why: Callable[[], str] | None = None) -> str | None:
    """Wait for the daemon after its unmount (EXIT_TIMEOUT by default); escalate to SIGTERM
    and SIGKILL. Returns a complaint.

    *why* is asked, before the SIGTERM changes anything, why the daemon may still be there."""
    timeout = EXIT_TIMEOUT if timeout is None else timeout
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        reason = ""
        if why is not None:
            try:
                reason = "\n" + why()
            except Exception as e:  # noqa: BLE001 - the diagnosis must not hide the failure
                reason = f"\n(no diagnosis: {type(e).__name__}: {e})"
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(5)
            return (f"daemon pid {proc.pid} did not exit within {timeout:.0f}s after unmount "
                    f"(SIGTERM needed; then exit status {rc}){reason}")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"daemon pid {proc.pid} ignored SIGTERM (SIGKILL needed){reason}"
    if rc != 0:
        return f"daemon pid {proc.pid} exited with status {rc} after unmount"
    return None


_SYS_PIDFD_GETFD = 438  # the same number on every architecture


def daemon_connection_alive(pid: int) -> bool | None:
    """Whether the FUSE connection that daemon *pid* serves is still there, asked as libfuse
    asks before its own unmount: its /dev/fuse fd (a copy through pidfd_getfd) polls POLLERR
    once the kernel has ended the connection.  None when that cannot be told."""
    try:
        fds = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"]
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    connected = []
    try:
        for fd in fds:
            copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if copy < 0:
                continue
            try:
                poller = select.poll()
                poller.register(copy, select.POLLIN)
                connected.append(not any(ev & select.POLLERR for _, ev in poller.poll(0)))
            finally:
                os.close(copy)
    finally:
        os.close(pidfd)
    return any(connected) if connected else None


def _threads(pid: int) -> str:
    """Each thread of *pid*: name, state and the kernel function it waits in."""
    out = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with contextlib.suppress(OSError):
                stat_line = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                state = stat_line.rsplit(")", 1)[1].split()[0]
                wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text().strip() or "-"
                out.append(f"{tid} {_comm(f'{pid}/task/{tid}')} {state} {wchan}")
    return "; ".join(out) or "?"


def why_daemon_lives(dm: "DaemonMount", result: UnmountResult | None) -> str:
    """Why a FUSE daemon still runs after its unmount: the unmount taken, whether the kernel
    still has its connection (then it rightly waits for requests, and what keeps the
    filesystem is named), its threads."""
    lines = [f"  unmount: {result.summary() if result else 'done by the test itself'}"
             + (" (LAZY: only detached)" if result and result.lazy else "")]
    alive = daemon_connection_alive(dm.pid)
    if alive is False:
        lines.append("  its FUSE connection has ended (POLLERR on its /dev/fuse fd), yet it runs: "
                     "the daemon's exit path is at fault")
    else:
        lines.append("  its FUSE connection is " + (
            "still alive (its /dev/fuse fd polls without POLLERR): the kernel never ended the "
            "session, so the daemon rightly waits for requests" if alive
            else "in an unknown state (its /dev/fuse fd could not be polled)"))
    if alive is not False and dm.device:
        # with the connection alive its filesystem lives: the device number is still its own
        lines.append(f"  fusectl for device {dm.device}: {fuse_connection_state(dm.device)}")
        attached = any(m.mount_id == dm.mount_id for m in mounts_at(dm.mnt))
        ids = {dm.mount_id} if attached or (result is not None and result.lazy) else set()
        holders = mount_holders(ids, dm.device)
        lines += [f"  held by: {h}" for h in holders] or [
            "  held by: no process, fd, cwd, root, mapping or other mount namespace found"]
    lines.append(f"  daemon threads (tid name state wchan): {_threads(dm.pid)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# option strings


def alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie (a double-forked daemon is reaped by init,
    which can take seconds here; it has exited all the same)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def overlayfuse_pids(mnt: os.PathLike[str] | str) -> list[int]:
    """Live overlayfuse processes with *mnt* (absolute) in their command line: a background
    daemon keeps the argv of the command that started it."""
    key = os.fsencode(os.path.abspath(mnt))
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if key in argv and any(b"overlayfuse" in a for a in argv) and alive(int(d)):
            out.append(int(d))
    return out


def esc(path: os.PathLike[str] | str) -> str:
    """Escape a path for a mount option value (``\\:`` and ``\\,``, as overlayfs accepts)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(lowers: Sequence[os.PathLike[str] | str], upper: os.PathLike[str] | str | None,
                    work: os.PathLike[str] | str | None, extra: Sequence[str] = ()) -> str:
    """``lowerdir=L1:L2[,upperdir=U,workdir=W][,extra...]`` with absolute, escaped paths."""
    if not lowers:
        raise ValueError("at least one lower dir is needed")
    if (upper is None) != (work is None):
        raise ValueError("upper and work must both be given or both be None")
    items = ["lowerdir=" + ":".join(esc(os.path.abspath(p)) for p in lowers)]
    if upper is not None and work is not None:
        items += [f"upperdir={esc(os.path.abspath(upper))}",
                  f"workdir={esc(os.path.abspath(work))}"]
    items += [e for e in extra if e]
    return ",".join(items)


# ---------------------------------------------------------------------------------------------
# kernel overlay


@contextlib.contextmanager
def kernel_overlay(lowers: Sequence[os.PathLike[str] | str], upper: os.PathLike[str] | str | None,
                   work: os.PathLike[str] | str | None, mnt: os.PathLike[str] | str,
                   opts: str = "redirect_dir=on,index=on") -> Iterator[Path]:
    """Mount the kernel's overlayfs with mount(8); yields the mount point, always unmounts."""
    if any("," in str(p) for p in (*lowers, upper or "", work or "")):
        raise ValueError("mount(8) cannot pass a ',' inside an overlay path")
    o = overlay_options(lowers, upper, work, [x for x in opts.split(",") if x])
    before = len(mounts_at(mnt))
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", o, os.fspath(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(f"mount -t overlay -o {o} {mnt}: {r.stderr.strip()} (see dmesg)")
    if len(mounts_at(mnt)) <= before:
        raise MountError(f"mount -t overlay reported success but {mnt} is not a mount point")
    try:
        yield Path(mnt)
    finally:
        if not force_unmount(mnt):
            raise MountError(f"could not unmount kernel overlay at {mnt}")


# ---------------------------------------------------------------------------------------------
# FUSE daemons


@dataclass
class DaemonMount:
    """A running FUSE daemon and its mount: what the mount context managers yield."""

    pid: int
    mnt: Path
    log: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    user: Any = field(default=None, repr=False)
    device: str = ""  # the mount's "major:minor", also the FUSE connection's name
    mount_id: int = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _log_path(mnt: Path, name: str) -> Path:
    """A fresh log file next to the mount point (inside the test's tmp dir), never reused."""
    i = 0
    while True:
        p = mnt.parent / f".{mnt.name}.{name}.{i}.log"
        if not p.exists():
            return p
        i += 1


@contextlib.contextmanager
def _daemon(argv: Sequence[str], mnt: os.PathLike[str] | str, what: str, *,
            user: "Unprivileged | None" = None, env: dict[str, str] | None = None,
            cwd: str | None = None) -> Iterator[DaemonMount]:
    mntp = Path(os.path.abspath(mnt))
    logfile = _log_path(mntp, what.split()[0].replace("/", "_"))
    before = len(mounts_at(mntp))
    with open(logfile, "wb") as errf:
        if user is not None:
            proc = user.popen(list(argv), stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                              cwd=cwd, start_new_session=True)
        else:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=errf,
                                    stderr=errf, env=env, cwd=cwd, start_new_session=True)
    dm = DaemonMount(proc.pid, mntp, logfile, proc, user)
    try:
        _wait_ready(str(mntp), before, proc, logfile, what)
    except BaseException:
        force_unmount(mntp, user)
        _stop(proc, timeout=2)
        raise
    here = mounts_at(mntp)
    if len(here) > before:
        dm.device, dm.mount_id = here[-1].device, here[-1].mount_id
    failed: BaseException | None = None
    try:
        yield dm
    except BaseException as e:
        failed = e
        e.add_note(_tail(logfile))
        raise
    finally:
        result: UnmountResult | None = None
        try:
            if len(mounts_at(mntp)) > before:
                result = unmount(mntp, user)
        finally:  # the daemon is waited for (and, if need be, killed) whatever happened
            complaint = _stop(proc, why=lambda: why_daemon_lives(dm, result))
        gone = result is None or result.ok
        if failed is not None:
            if complaint:
                failed.add_note(f"and then {what}: {complaint}")
        else:
            if not gone and result is not None:
                raise MountError(f"could not unmount {what} at {mntp} ({result.summary()})\n"
                                 f"{_tail(logfile)}")
            if complaint:
                raise MountError(f"{what}: {complaint}\n{_tail(logfile)}")


def overlayfuse_argv(opts: str, mnt: os.PathLike[str] | str,
                     python: str | None = None) -> list[str]:
    """The command line that mounts overlayfuse in the foreground with the FUSE backend."""
    return [python or sys.executable, "-m", "overlayfuse", "mount", "--backend", "fuse", "-f",
            "-o", opts, os.path.abspath(mnt)]


def overlayfuse_mount(lowers: Sequence[os.PathLike[str] | str],
                      upper: os.PathLike[str] | str | None,
                      work: os.PathLike[str] | str | None, mnt: os.PathLike[str] | str,
                      extra: Sequence[str] = (), user: "Unprivileged | None" = None
                      ) -> contextlib.AbstractContextManager[DaemonMount]:
    """Run ``python -m overlayfuse mount --backend fuse -f`` until the with-block ends.

    *extra* are more ``-o`` items (``volatile``, ``redirect_dir=on``...). With *user* (the
    ``unprivileged`` fixture) the daemon runs as that user through Debian's python3 and mounts
    via fusermount3.
    """
    opts = overlay_options(lowers, upper, work, extra)
    if user is not None:
        return _daemon(overlayfuse_argv(opts, mnt, user.python), mnt, "overlayfuse", user=user,
                       cwd=str(user.home))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return _daemon(overlayfuse_argv(opts, mnt), mnt, "overlayfuse", env=env, cwd=str(REPO))


def fuse_overlayfs_mount(lowers: Sequence[os.PathLike[str] | str],
                         upper: os.PathLike[str] | str | None,
                         work: os.PathLike[str] | str | None, mnt: os.PathLike[str] | str,
                         extra: Sequence[str] = (), user: "Unprivileged | None" = None
                         ) -> contextlib.AbstractContextManager[DaemonMount]:
    """The same as :func:`overlayfuse_mount` for the fuse-overlayfs binary (for comparison)."""
    argv = ["fuse-overlayfs", "-f", "-o", overlay_options(lowers, upper, work, extra),
            os.path.abspath(mnt)]
    if user is not None:
        return _daemon(argv, mnt, "fuse-overlayfs", user=user, cwd=str(user.home))
    return _daemon(argv, mnt, "fuse-overlayfs")


# ---------------------------------------------------------------------------------------------
# tree snapshots

_TYPES = ((stat.S_ISDIR, "d"), (stat.S_ISREG, "f"), (stat.S_ISLNK, "l"), (stat.S_ISCHR, "c"),
          (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s"))


def file_type(mode: int) -> str:
    """One letter for the file type in *mode* (``d f l c b p s``)."""
    for test, letter in _TYPES:
        if test(mode):
            return letter
    return "?"


def user_xattrs(path: os.PathLike[str] | str,
                hide: Sequence[str] = PRIVATE_XATTR_PREFIXES) -> tuple[tuple[str, bytes], ...]:
    """Sorted (name, value) of *path*'s xattrs without following symlinks, overlay ones hidden."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise
    out = []
    for n in sorted(names):
        if n.startswith(tuple(hide)):
            continue
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            out.append((n, f"<{errno.errorcode.get(e.errno, e.errno)}>".encode()))
    return tuple(out)


def _content(path: str, st: os.stat_result) -> str | None:
    t = file_type(st.st_mode)
    if t == "f":
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            return f"<unreadable {errno.errorcode.get(e.errno, e.errno)}>"
        return h.hexdigest()
    if t == "l":
        return os.readlink(path)
    if t in "cb":
        return f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    return None


def tree_snapshot(path: os.PathLike[str] | str, *, owner: bool = False,
                  hide_xattrs: Sequence[str] = PRIVATE_XATTR_PREFIXES
                  ) -> dict[str, tuple[Any, ...]]:
    """Map each relative path under *path* (``"."`` for the root) to what a user can see.

    Value: ``(type, mode, size, content, xattrs)`` where content is the sha256 of a file, a
    symlink's target or a device's ``major,minor``; directory sizes are ``None`` because they
    differ between filesystems. With ``owner=True``, ``(uid, gid)`` is appended. Symlinks are
    never followed, so two merged trees can be compared with ``==``.
    """
    root = os.fspath(path)
    snap: dict[str, tuple[Any, ...]] = {}

    def visit(abspath: str, rel: str) -> None:
        st = os.lstat(abspath)
        t = file_type(st.st_mode)
        entry: tuple[Any, ...] = (t, stat.S_IMODE(st.st_mode), None if t == "d" else st.st_size,
                                  _content(abspath, st), user_xattrs(abspath, hide_xattrs))
        if owner:
            entry += (st.st_uid, st.st_gid)
        snap[rel] = entry
        if t == "d":
            for name in sorted(os.listdir(abspath)):
                visit(os.path.join(abspath, name), name if rel == "." else f"{rel}/{name}")

    visit(root, ".")
    return snap


def diff_trees(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k, '<missing>')!r} != {b.get(k, '<missing>')!r}")
    return out
