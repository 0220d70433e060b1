"""The probe: the one place that decides which backends work here, by trying them for real.

For each backend it mounts a tiny overlay (two lowers, an upper, a work dir) in a scratch dir on
the same filesystem as the upper, deletes a lower file through it and checks that a whiteout
appears in the upper, and writes a file and checks that it lands in the upper.  Asking the
kernel is the only reliable answer: sysctls, LSMs, seccomp, container runtimes and the upper
filesystem's features all have a say, and only a real mount hears all of them.

The kernel trials run in a forked child with a private mount namespace, so a killed probe never
leaves an overlay mounted; the FUSE trial mounts in the caller's namespace (as the FUSE backend
does) and is unmounted in a ``finally``.  Scratch dirs carry the prober's PID; a later probe
removes those whose owner is gone.  Verdicts are cached per kernel release+version, uid and
upper filesystem, so a cached "no" never outlives a kernel change.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from . import format as fmt
from . import sysmount
from .errors import OverlayfuseError
from .spec import OverlaySpec

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("kernel", "kernel-userns", "fuse")
SCRATCH_PREFIX = ".overlayfuse-probe-"
CACHE_FORMAT = 2
CACHE_MAX_AGE = 7 * 24 * 3600
TRIAL_TIMEOUT = 20.0

USERNS_MOUNT_REASON = ("a mount inside a private user namespace is invisible to your other "
                       "processes, so kernel-userns serves only `run`")


@dataclass
class Facts:
    """What the probe learned about the kernel and the directory, independent of backends."""

    kernel_release: str
    kernel_version: str
    uid: int
    user: str
    directory: str
    fs_type: str
    fs_magic: str
    dev: str
    mknod_whiteout: bool = False
    trusted_xattr: bool = False
    user_xattr: bool = False
    d_type: bool = False
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Trial:
    """One backend's trial: did the overlay work, why (not), and how long it took."""

    ok: bool
    reason: str
    seconds: float = 0.0


@dataclass
class Report:
    """The probe's answer: facts plus a trial per backend."""

    facts: Facts
    trials: dict[str, Trial]
    cached: bool = False
    probed_at: float = 0.0
    seconds: float = 0.0

    def verdict(self, backend: str, purpose: str = "mount") -> "Verdict":
        """Can ``backend`` serve ``purpose`` ("mount" or "run") here?"""
        from .backends.base import Verdict
        trial = self.trials.get(backend)
        if trial is None:
            return Verdict(False, f"{backend} was not probed")
        if backend == "kernel-userns" and purpose == "mount":
            return Verdict(False, USERNS_MOUNT_REASON)
        return Verdict(trial.ok, trial.reason)

    def can_mount(self) -> bool:
        return any(self.verdict(b, "mount").ok for b in BACKENDS)

    def preferred(self, purpose: str) -> str | None:
        """The backend ``auto`` picks for ``purpose``, or None when none works."""
        order = ("kernel", "fuse") if purpose == "mount" else BACKENDS
        for b in order:
            if self.verdict(b, purpose).ok:
                return b
        return None

    def to_dict(self) -> dict:
        return {
            "kernel": {"release": self.facts.kernel_release,
                       "version": self.facts.kernel_version},
            "uid": self.facts.uid,
            "user": self.facts.user,
            "directory": self.facts.directory,
            "filesystem": {"type": self.facts.fs_type, "magic": self.facts.fs_magic,
                           "dev": self.facts.dev},
            "features": {"mknod_whiteout": self.facts.mknod_whiteout,
                         "trusted_xattr": self.facts.trusted_xattr,
                         "user_xattr": self.facts.user_xattr,
                         "d_type": self.facts.d_type},
            "feature_notes": self.facts.notes,
            "backends": {
                b: {"mount": asdict(self.verdict(b, "mount")),
                    "run": asdict(self.verdict(b, "run")),
                    "trial": asdict(t)}
                for b, t in self.trials.items()},
            "choice": {"mount": self.preferred("mount"), "run": self.preferred("run")},
            "can_mount": self.can_mount(),
            "cached": self.cached,
            "probed_at": self.probed_at,
            "probe_seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        facts = Facts(
            kernel_release=d["kernel"]["release"], kernel_version=d["kernel"]["version"],
            uid=d["uid"], user=d["user"], directory=d["directory"],
            fs_type=d["filesystem"]["type"], fs_magic=d["filesystem"]["magic"],
            dev=d["filesystem"]["dev"], notes=d.get("feature_notes", {}),
            **d["features"])
        trials = {b: Trial(**v["trial"]) for b, v in d["backends"].items()}
        return cls(facts, trials, cached=d.get("cached", False),
                   probed_at=d.get("probed_at", 0.0), seconds=d.get("probe_seconds", 0.0))

    def format_text(self) -> str:
        """The human report of ``overlayfuse check``."""
        f = self.facts

        def yn(ok: bool, note: str | None = None) -> str:
            return ("yes" if ok else "no") + (f" ({note})" if note and not ok else "")

        lines = [
            f"kernel:     {f.kernel_release} {f.kernel_version}",
            f"user:       {f.user} (uid {f.uid})",
            f"directory:  {f.directory}",
            f"filesystem: {f.fs_type} (magic {f.fs_magic}, dev {f.dev})",
            f"  whiteouts (mknod c 0 0): {yn(f.mknod_whiteout, f.notes.get('mknod'))}",
            f"  trusted.* xattrs:        {yn(f.trusted_xattr, f.notes.get('trusted_xattr'))}",
            f"  user.* xattrs:           {yn(f.user_xattr, f.notes.get('user_xattr'))}",
            f"  d_type:                  {yn(f.d_type, f.notes.get('d_type'))}",
            "backends:",
        ]
        for b in BACKENDS:
            t = self.trials.get(b)
            if t is None:
                continue
            if b == "kernel-userns" and t.ok:
                state = "supported for run only"
            else:
                state = "supported" if t.ok else "NOT supported"
            lines.append(f"  {b:<14} {state}: {t.reason}")
        m, r = self.preferred("mount"), self.preferred("run")
        lines.append(f"auto chooses: mount -> {m or 'nothing works'}, "
                     f"run -> {r or 'nothing works'}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.probed_at))
        how = f"cached result from {when}" if self.cached else "probed now"
        lines.append(f"probe: {how}, took {self.seconds * 1000:.0f} ms")
        return "\n".join(lines)


# -- public entry ----------------------------------------------------------------------------

def probe(directory: str | None = None, *, refresh: bool = False,
          backends: Sequence[str] = BACKENDS, use_cache: bool = True) -> Report:
    """Probe the backends for an upper dir on the filesystem of ``directory``.

    ``directory`` must exist and be writable: the scratch dir is made inside it (default: the
    current dir if writable, else the temp dir).  ``refresh`` ignores and replaces the cache.
    """
    directory = os.path.abspath(directory or _default_directory())
    if not os.path.isdir(directory):
        raise OverlayfuseError(f"cannot probe {directory}: not a directory")
    key = _cache_key(directory)
    if use_cache and not refresh:
        cached = _cache_get(key)
        if cached is not None and set(backends) <= set(cached.trials):
            cached.facts.directory = directory
            return cached
    started = time.monotonic()
    with signals_unwind():
        report = _probe_uncached(directory, backends)
    report.seconds = time.monotonic() - started
    report.probed_at = time.time()
    log.debug("probe of %s took %.3f s", directory, report.seconds)
    if use_cache:
        _cache_put(key, report)
    return report


def probe_dir_for(spec: OverlaySpec) -> str:
    """Where to probe for ``spec``: a writable dir on the upper's filesystem.

    The upper's parent (where its work dir usually sits too), else the work dir itself (the
    scratch dir is gone before the mount); a read-only overlay has no upper: the temp dir.
    """
    if spec.upperdir is None:
        return _default_directory(prefer_cwd=False)
    upper = os.path.abspath(spec.upperdir)
    try:
        dev = os.stat(upper).st_dev
    except OSError as e:
        raise OverlayfuseError(f"upper dir {upper}: {e.strerror}") from None
    candidates = [os.path.dirname(upper)]
    if spec.workdir:
        candidates.append(os.path.abspath(spec.workdir))
    candidates.append(upper)
    for c in candidates:
        try:
            if os.stat(c).st_dev == dev and os.access(c, os.W_OK | os.X_OK):
                return c
        except OSError:
            continue
    raise OverlayfuseError(f"cannot probe the filesystem of {upper}: no writable dir on it")


def _default_directory(prefer_cwd: bool = True) -> str:
    if prefer_cwd:
        try:
            cwd = os.getcwd()
            if os.access(cwd, os.W_OK | os.X_OK):
                return cwd
        except OSError:
            pass
    return tempfile.gettempdir()


# -- the uncached probe ----------------------------------------------------------------------

def _probe_uncached(directory: str, backends: Sequence[str]) -> Report:
    _remove_stale_scratch(directory)
    facts = _base_facts(directory)
    trials: dict[str, Trial] = {}
    try:
        scratch = _make_scratch(directory)
    except OSError as e:
        why = f"cannot create a scratch dir in {directory}: {e.strerror}"
        return Report(facts, {b: Trial(False, why) for b in backends})
    try:
        _fs_facts(scratch, facts)
        lowers = _make_lowers(scratch)
        for b in backends:
            t0 = time.monotonic()
            try:
                ok, reason = _TRIALS[b](scratch, lowers, facts)
            except OverlayfuseError as e:
                ok, reason = False, str(e)
            except OSError as e:
                ok, reason = False, f"trial failed: {e}"
            # name the user's directory, not the scratch dir that is gone after the probe
            reason = re.sub(re.escape(scratch) + r"(/[\w-]+)*", directory, reason)
            trials[b] = Trial(ok, reason, round(time.monotonic() - t0, 4))
            log.debug("probe %s: %s (%s)", b, ok, reason)
    finally:
        _remove_scratch(scratch)
    return Report(facts, trials)


def _base_facts(directory: str) -> Facts:
    u = os.uname()
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    st = os.stat(directory)
    magic = sysmount.statfs_type(directory)
    fstype = sysmount.mount_fstype(directory) or sysmount.FS_MAGIC.get(magic, "unknown")
    return Facts(kernel_release=u.release, kernel_version=u.version, uid=uid, user=user,
                 directory=directory, fs_type=fstype, fs_magic=f"0x{magic:x}",
                 dev=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")


def _fs_facts(scratch: str, facts: Facts) -> None:
    """mknod c 0 0, trusted.* and user.* xattrs, d_type: tried in the scratch dir."""
    probe_dir = os.path.join(scratch, "facts")
    os.mkdir(probe_dir)
    wh = os.path.join(probe_dir, "whiteout")
    try:
        os.mknod(wh, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        facts.mknod_whiteout = True
    except OSError as e:
        facts.notes["mknod"] = e.strerror or str(e)
    f = os.path.join(probe_dir, "file")
    with open(f, "w"):
        pass
    for attr, ns in (("trusted_xattr", "trusted"), ("user_xattr", "user")):
        try:
            os.setxattr(f, f"{ns}.overlayfuse.probe", b"y")
            ok = os.getxattr(f, f"{ns}.overlayfuse.probe") == b"y"
            setattr(facts, attr, ok)
        except OSError as e:
            facts.notes[attr] = e.strerror or str(e)
    try:
        types = sysmount.dir_d_types(probe_dir)
        facts.d_type = types.get("file") == sysmount.DT_REG
        if not facts.d_type:
            facts.notes["d_type"] = "getdents64 returns DT_UNKNOWN"
    except OSError as e:
        facts.notes["d_type"] = e.strerror or str(e)


def _make_scratch(directory: str) -> str:
    path = os.path.join(directory, f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    return path


def _make_lowers(scratch: str) -> list[str]:
    """Two lowers: ``top`` only above, ``both`` in each (the upper one wins), ``gone`` below."""
    l1, l2 = os.path.join(scratch, "l1"), os.path.join(scratch, "l2")
    os.mkdir(l1)
    os.mkdir(l2)
    for path, data in ((f"{l1}/top", "top"), (f"{l1}/both", "upper"),
                       (f"{l2}/both", "lower"), (f"{l2}/gone", "gone")):
        with open(path, "w") as f:
            f.write(data)
    # let every user read the lowers: a uid-mapped trial must see them
    for p in (scratch, l1, l2):
        os.chmod(p, 0o755)
    return [l1, l2]


def _trial_dirs(scratch: str, name: str) -> tuple[str, str, str]:
    base = os.path.join(scratch, name)
    os.mkdir(base)
    dirs = tuple(os.path.join(base, d) for d in ("upper", "work", "merged"))
    for d in dirs:
        os.mkdir(d)
    return dirs  # type: ignore[return-value]


def exercise(merged: str) -> None:
    """Use the trial overlay: listing, lookup order, delete a lower file, write a new one."""
    names = sorted(os.listdir(merged))
    if names != ["both", "gone", "top"]:
        raise AssertionError(f"merged listing is {names}, expected both, gone, top")
    with open(os.path.join(merged, "both")) as f:
        if f.read() != "upper":
            raise AssertionError("the upper lower dir does not hide the one below")
    os.unlink(os.path.join(merged, "gone"))
    with open(os.path.join(merged, "new"), "w") as f:
        f.write("new")
    names = sorted(os.listdir(merged))
    if names != ["both", "new", "top"]:
        raise AssertionError(f"after delete and write the listing is {names}")


def _xattr_whiteout(directory: str, name: str, st: os.stat_result) -> bool:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        return fmt.is_xattr_whiteout(fd, os.fsencode(name), st)
    finally:
        os.close(fd)


def _verify_upper(upper: str, lowers: Sequence[str], allow_xattr_whiteout: bool) -> tuple[bool, str]:
    """Check the trial's traces in the upper dir, in the shared on-disk format."""
    try:
        st = os.lstat(os.path.join(upper, "gone"))
    except FileNotFoundError:
        return False, "deleting a lower file left no whiteout in the upper dir"
    if fmt.is_whiteout_stat(st):
        wh = "whiteout char 0/0"
    elif allow_xattr_whiteout and _xattr_whiteout(upper, "gone", st):
        wh = "whiteout as an xattr-marked file (mknod refused)"
    else:
        return False, "deleting a lower file left no whiteout in the upper dir"
    try:
        with open(os.path.join(upper, "new")) as f:
            if f.read() != "new":
                return False, "a file written through the overlay has other data in the upper"
    except FileNotFoundError:
        return False, "a file written through the overlay did not land in the upper dir"
    if not os.path.exists(os.path.join(lowers[1], "gone")):
        return False, "deleting through the overlay removed the lower file itself"
    return True, wh


# -- forked trials ---------------------------------------------------------------------------

def in_child(fn: Callable[[], str], timeout: float = TRIAL_TIMEOUT) -> tuple[bool, str]:
    """Run ``fn`` in a forked child and return (ok, message); its exception text is the reason.

    The child dies with us (PDEATHSIG) and is killed after ``timeout``, so a hung filesystem
    cannot hang the probe.  It never returns into the caller's code.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            sysmount.set_pdeathsig(signal.SIGKILL)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            msg = "ok " + fn()
            code = 0
        except BaseException as e:  # the reason goes to the parent, never a traceback
            msg = "no " + _describe(e)
        try:
            os.write(w, msg.encode(errors="replace")[:65536])
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    finished = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            data = os.read(r, 65536)
            if not data:
                finished = True
                break
            chunks.append(data)
    finally:
        os.close(r)
        if not finished:  # timed out, or we are being interrupted
            _kill(pid)
        _reap(pid)
    if timed_out:
        return False, f"the trial did not finish within {timeout:.0f} s"
    msg = b"".join(chunks).decode(errors="replace")
    if not msg:
        return False, "the trial process died without an answer"
    return msg.startswith("ok "), msg[3:]


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _trial_kernel(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    upper, work, merged = _trial_dirs(scratch, "kernel")

    def child() -> str:
        try:
            # a private mount namespace: same privilege check as the caller's, but a probe
            # killed mid-trial can never leave an overlay behind
            sysmount.unshare(sysmount.CLONE_NEWNS)
        except PermissionError:
            if facts.uid == 0:
                raise OverlayfuseError("mounting is not permitted: this root process lacks "
                                       "CAP_SYS_ADMIN") from None
            raise OverlayfuseError(
                f"mounting needs root (CAP_SYS_ADMIN); you are {facts.user}") from None
        sysmount.make_rprivate()
        try:
            sysmount.mount_overlay(lowers, upper, work, merged)
        except OSError as e:
            raise OverlayfuseError(_refusal(e, "kernel overlayfs", facts)) from None
        exercise(merged)
        sysmount.umount2(merged)
        return "mount(2) of overlayfs works here"

    ok, reason = in_child(child)
    if not ok:
        return False, reason
    ok, how = _verify_upper(upper, lowers, allow_xattr_whiteout=False)
    return ok, (f"{reason} (trial: {how}, copy-up into the upper)" if ok else how)


def _trial_userns(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    upper, work, merged = _trial_dirs(scratch, "userns")
    uid, gid = os.geteuid(), os.getegid()

    def child() -> str:
        try:
            sysmount.unshare(sysmount.CLONE_NEWUSER | sysmount.CLONE_NEWNS)
        except OSError as e:
            raise OverlayfuseError(
                "cannot create a user namespace: unshare(CLONE_NEWUSER) failed: "
                + os.strerror(e.errno or 0)
                + (" (user.max_user_namespaces is 0?)" if e.errno == errno.ENOSPC else "")
            ) from None
        sysmount.map_ids(uid, uid, gid, gid)
        sysmount.make_rprivate()
        try:
            sysmount.mount_overlay(lowers, upper, work, merged, userxattr=True)
        except OSError as e:
            raise OverlayfuseError(_refusal(e, "kernel overlayfs in a user namespace",
                                            facts)) from None
        exercise(merged)
        sysmount.umount2(merged)
        return "overlayfs mounts in a new user+mount namespace with userxattr"

    ok, reason = in_child(child)
    if not ok:
        return False, reason
    ok, how = _verify_upper(upper, lowers, allow_xattr_whiteout=False)
    return ok, (f"{reason} (trial: {how}, copy-up into the upper)" if ok else how)


def fuse_preconditions() -> str | None:
    """Why a FUSE mount cannot work here without even trying (None: it may)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (fuse module not loaded?)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "cannot open /dev/fuse: permission denied"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "fusermount3 not found: an unprivileged FUSE mount needs it"
    return None


def _trial_fuse(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    why_not = fuse_preconditions()
    if why_not:
        return False, why_not
    try:
        from .fusefs.daemon import mount_fuse
    except Exception as e:  # ImportError, or the daemon module failing to load
        return False, f"the FUSE daemon cannot load: {e}"
    upper, work, merged = _trial_dirs(scratch, "fuse")
    spec = OverlaySpec(lowerdirs=tuple(lowers), upperdir=upper, workdir=work)
    pid = None
    try:
        with deferred_signals():
            pid = mount_fuse(spec, merged)
    except OverlayfuseError as e:
        return False, f"the FUSE mount failed: {e}"
    except BaseException:
        if pid is not None:
            unmount_fuse(merged, pid, wait=False)
        raise
    try:
        ok, reason = in_child(lambda: exercise(merged) or "the FUSE daemon mounts and serves")
    finally:
        unmount_fuse(merged, pid, wait=False)
    if not ok:
        return False, f"the FUSE trial failed: {reason}"
    ok, how = _verify_upper(upper, lowers, allow_xattr_whiteout=True)
    return ok, (f"{reason} (trial: {how}, copy-up into the upper)" if ok else how)


def _refusal(e: OSError, who: str, facts: Facts) -> str:
    text = re.sub(r"^(fsconfig [\w+]+|fsopen|fsmount|move_mount|mount): ", "",
                  e.strerror or str(e))
    text = re.sub(r"^overlay(fs)?: ", "", text)
    if e.errno == errno.EPERM:
        return f"{who} refused: permission denied ({text})"
    if text == os.strerror(e.errno or 0):
        text += " (the kernel gave no reason; dmesg may say more)"
    return f"{who} refused the trial mount on {facts.fs_type}: {text}"


_TRIALS: dict[str, Callable[[str, list[str], Facts], tuple[bool, str]]] = {
    "kernel": _trial_kernel, "kernel-userns": _trial_userns, "fuse": _trial_fuse}


# -- FUSE unmount (shared with the fuse backend) ---------------------------------------------

def unmount_fuse(mountpoint: str, pid: int | None, timeout: float = 10.0,
                 wait: bool = True) -> None:
    """Unmount a FUSE mount and wait for its daemon to exit; escalate so nothing stays.

    ``wait=False`` leaves the wait (and the SIGTERM/SIGKILL after ``timeout``) to a background
    thread: once unmounted the daemon only has to exit, which takes it up to two seconds, and
    the probe must not pay for that.
    """
    for attempt in range(20):
        if not sysmount.is_mountpoint(mountpoint):
            break
        res = subprocess.run(["fusermount3", "-u", "-q", mountpoint],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode == 0:
            break
        if "busy" in res.stderr.lower() and attempt < 10:
            time.sleep(0.05)
            continue
        # still busy or unknown trouble: detach it lazily, the daemon then sees ENODEV
        subprocess.run(["fusermount3", "-u", "-z", "-q", mountpoint],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if os.geteuid() == 0 and sysmount.is_mountpoint(mountpoint):
            try:
                sysmount.umount2(mountpoint, sysmount.MNT_DETACH)
            except OSError:
                pass
        break
    if pid is None:
        return
    if wait:
        wait_pid_gone(pid, timeout)
    else:
        threading.Thread(target=wait_pid_gone, args=(pid, timeout), daemon=True,
                         name=f"overlayfuse-reap-{pid}").start()


def wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait for ``pid`` (not necessarily our child) to exit; SIGTERM, then SIGKILL it."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + (timeout if sig is None else 2.0)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:
                pass  # not our child: poll for its existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)


# -- scratch cleanup -------------------------------------------------------------------------

_SCRATCH_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-[0-9a-f]+$")


def _remove_stale_scratch(directory: str) -> None:
    """Remove scratch dirs left by probes that were killed (their PID is gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _SCRATCH_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (or another user's): not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.info("removing scratch dir %s left by a killed probe", name)
        _remove_scratch(os.path.join(directory, name))


def _remove_scratch(path: str) -> None:
    """Unmount whatever is mounted inside ``path``, then remove it, whatever the modes."""
    for mp in sysmount.mounts_under(path):
        unmount_fuse(mp, None)
        if sysmount.is_mountpoint(mp) and os.geteuid() == 0:
            try:
                sysmount.umount2(mp, sysmount.MNT_DETACH)
            except OSError:
                pass
    rmtree_force(path)


def rmtree_force(path: str) -> None:
    """shutil.rmtree that also gets through what overlayfs leaves mode 000 (work/work).

    Permission errors are fixed once per path by chmod; anything else is logged and skipped,
    so a strange filesystem cannot make this loop.
    """
    tried: set[str] = set()

    def fix(func: Callable, p: str, excinfo: tuple) -> None:
        exc = excinfo[1]
        if isinstance(exc, FileNotFoundError):
            return
        if not isinstance(exc, PermissionError) or p in tried:
            log.warning("cannot remove %s: %s", p, exc)
            return
        tried.add(p)
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=fix)
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", p, e)

    shutil.rmtree(path, onerror=fix)


# -- signals ---------------------------------------------------------------------------------

class Interrupted(BaseException):
    """A terminating signal turned into an exception, so every ``finally`` cleans up."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


_critical = 0
_pending: int | None = None
UNWIND_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _unwind_handler(sig: int, frame: object) -> None:
    global _pending
    if _critical:
        _pending = sig  # raised when the critical section ends
        return
    raise Interrupted(sig)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back the unwinding signals while a resource is created and not yet owned.

    A signal between "the daemon mounted" and "we know its PID" would leak the mount; inside
    this block it waits, and is raised at the end of the block (only when the block succeeded,
    so the caller's ``except``/``finally`` sees either its own error or the interruption).
    """
    global _critical, _pending
    _critical += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _critical -= 1
    if ok and _critical == 0 and _pending is not None:
        sig, _pending = _pending, None
        raise Interrupted(sig)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted`` for the block, so ``finally`` cleans
    up; afterwards the signal is re-delivered with the old handlers back (default: death).

    Only the main thread may install handlers; elsewhere the block relies on try/finally.
    Nested use is fine: the outermost block re-delivers.
    """
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is _unwind_handler:
        yield
        return
    old = {s: signal.signal(s, _unwind_handler) for s in UNWIND_SIGNALS}
    caught: int | None = None
    try:
        yield
    except Interrupted as e:
        caught = e.sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if _pending is not None and caught is None:
            caught, _pending = _pending, None
    if caught is not None:
        signal.raise_signal(caught)
        raise OverlayfuseError(f"interrupted by signal {caught}")


# -- cache -----------------------------------------------------------------------------------

def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "overlayfuse", "probe.json")


def _cache_key(directory: str) -> str:
    """Kernel release+version, uid, upper filesystem, and what else decides FUSE here."""
    u = os.uname()
    st = os.stat(directory)
    fstype = sysmount.mount_fstype(directory) or hex(sysmount.statfs_type(directory))
    try:
        fst = os.stat("/dev/fuse")
        fuse = f"{fst.st_mode:o}:{fst.st_uid}:{os.access('/dev/fuse', os.R_OK | os.W_OK)}"
    except OSError:
        fuse = "none"
    fm = shutil.which("fusermount3") is not None
    return (f"v{CACHE_FORMAT}|{u.release}|{u.version}|uid={os.geteuid()}|fs={fstype}|"
            f"dev={st.st_dev}|fuse={fuse}|fusermount3={fm}")


def _cache_load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
            return data
    except (OSError, ValueError):
        pass
    return {"format": CACHE_FORMAT, "entries": {}}


def _cache_get(key: str) -> Report | None:
    entry = _cache_load()["entries"].get(key)
    if not entry:
        return None
    # a second guard besides the key: the kernel that answered must be the running one
    u = os.uname()
    rep = Report.from_dict(entry)
    if (rep.facts.kernel_release, rep.facts.kernel_version) != (u.release, u.version):
        return None
    if time.time() - rep.probed_at > CACHE_MAX_AGE:
        return None
    rep.cached = True
    return rep


def _cache_put(key: str, report: Report) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _cache_load()
        u = os.uname()
        # drop entries of other kernels: they can never be valid again
        data["entries"] = {k: v for k, v in data["entries"].items()
                           if v.get("kernel") == {"release": u.release, "version": u.version}}
        data["entries"][key] = report.to_dict()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".probe-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write the probe cache %s: %s", path, e)


def clear_cache() -> None:
    """Forget every cached verdict."""
    try:
        os.unlink(cache_path())
    except FileNotFoundError:
        pass


# -- command line ----------------------------------------------------------------------------

def add_check_parser(subparsers: "argparse._SubParsersAction") -> "argparse.ArgumentParser":
    """``overlayfuse check``."""
    p = subparsers.add_parser(
        "check", help="which backends work here, and why not",
        description="Try each backend (kernel, kernel-userns, fuse) with a tiny real overlay in "
                    "a scratch dir on the filesystem of DIR and say which work and why not.")
    p.add_argument("--upper", metavar="DIR",
                   help="a directory on the filesystem for upper layers (default: the current "
                        "dir, or the temp dir when that is not writable)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--refresh", action="store_true", help="ignore cached verdicts, probe again")
    p.set_defaults(func=cmd_check)
    return p


def cmd_check(args: "argparse.Namespace") -> int:
    """Exit 0 when at least one backend can serve a mount, 1 otherwise."""
    try:
        report = probe(args.upper, refresh=args.refresh)
    except OverlayfuseError as e:
        print(f"overlayfuse: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.can_mount() else 1
