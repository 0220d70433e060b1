"""Real mounts for tests: kernel overlays, overlayfuse and fuse-overlayfs daemons, tree snapshots.

Every context manager here unmounts on exit, also when the test body raised: a mount left
behind breaks every later test and the developer's machine, so cleanup escalates (fusermount3,
then a lazy umount, then SIGTERM and SIGKILL for the daemon) instead of giving up. Daemons write
their stderr to a log file next to the mount point; its tail is attached to any failure.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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


def mountinfo() -> list[MountEntry]:
    """Parse /proc/self/mountinfo (mount points unescaped)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            entries.append(MountEntry(int(lf[0]), unescape_mountinfo(lf[4]), rf[0],
                                      unescape_mountinfo(rf[1]) if len(rf) > 1 else "",
                                      rf[2] if len(rf) > 2 else ""))
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


def force_unmount(path: os.PathLike[str] | str, user: "Unprivileged | None" = None) -> bool:
    """Unmount everything at *path*: fusermount3 -u (as *user* if given), else umount -l.

    Returns True when nothing is mounted there afterwards.
    """
    p = os.path.realpath(path)
    for _ in range(8):
        if not mounts_at(p):
            return True
        top = mounts_at(p)[-1]
        done = False
        if top.fstype.startswith("fuse"):
            argv = ["fusermount3", "-u", p]
            r = (user.run(argv, capture_output=True, text=True) if user is not None
                 else subprocess.run(argv, capture_output=True, text=True))
            done = r.returncode == 0
            if not done:
                log.warning("fusermount3 -u %s: %s", p, r.stderr.strip())
        if not done:
            r = subprocess.run(["umount", p], capture_output=True, text=True)
            done = r.returncode == 0
        if not done:
            r = subprocess.run(["umount", "-l", p], capture_output=True, text=True)
            if r.returncode != 0:
                log.warning("umount -l %s: %s", p, r.stderr.strip())
    return not mounts_at(p)


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


def _stop(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> str | None:
    """Wait for the daemon after its unmount; escalate to SIGTERM/SIGKILL. Returns a complaint."""
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
            return f"daemon pid {proc.pid} did not exit after unmount (SIGTERM needed)"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"daemon pid {proc.pid} ignored SIGTERM (SIGKILL needed)"
    if rc != 0:
        return f"daemon pid {proc.pid} exited with status {rc} after unmount"
    return None


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
    failed = False
    try:
        yield dm
    except BaseException as e:
        failed = True
        e.add_note(_tail(logfile))
        raise
    finally:
        gone = len(mounts_at(mntp)) <= before or force_unmount(mntp, user)
        complaint = _stop(proc)
        if not failed:
            if not gone:
                raise MountError(f"could not unmount {what} at {mntp}\n{_tail(logfile)}")
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
