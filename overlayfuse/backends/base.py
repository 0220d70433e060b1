"""The interface every backend implements, and the handle a mount returns."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

from ..errors import OverlayfuseError
from ..spec import OverlaySpec

log = logging.getLogger(__name__)

Purpose = Literal["mount", "run"]


@dataclass(frozen=True)
class Verdict:
    """Whether a backend can serve a purpose, and the reason in plain words either way."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Mount:
    """A live overlay at ``target``; ``unmount()`` (or leaving the ``with`` block) removes it.

    ``unmount`` is idempotent, so cleanup paths may call it without tracking state.
    """

    def __init__(self, backend: str, target: str, spec: OverlaySpec,
                 unmount: Callable[[], None], pid: int | None = None) -> None:
        self.backend = backend
        self.target = target
        self.spec = spec
        self.pid = pid
        self._unmount: Callable[[], None] | None = unmount

    @property
    def mounted(self) -> bool:
        return self._unmount is not None

    def unmount(self) -> None:
        """Remove the mount (and stop its daemon, if any); a second call does nothing."""
        fn, self._unmount = self._unmount, None
        if fn is not None:
            fn()

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def __repr__(self) -> str:
        state = "mounted" if self.mounted else "unmounted"
        return f"<Mount {self.backend} {self.target} {state}>"


class Backend:
    """One way of making an overlay: check, mount, run."""

    name: str = "?"

    def check(self, spec: OverlaySpec, purpose: Purpose) -> Verdict:
        """Can this backend serve ``purpose`` for ``spec`` here? Based on the probe's trial."""
        raise NotImplementedError

    def mount(self, spec: OverlaySpec, target: str) -> Mount:
        """Mount ``spec`` on ``target`` in the caller's mount namespace."""
        raise NotImplementedError

    def run(self, spec: OverlaySpec, argv: Sequence[str], cwd: str | None = None, *,
            mountpoint: str | None = None, env: dict[str, str] | None = None,
            map_root: bool = False) -> int:
        """Run ``argv`` with its cwd in the merged tree; return its exit status (128+sig)."""
        raise NotImplementedError


class CommandError(OverlayfuseError):
    """The command of ``run`` could not be started; ``status`` is the shell's code (126/127)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


SETUP_FAILED = 125  # run's own failure, as docker/podman report it
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def spawn(argv: Sequence[str], cwd: Callable[[], str] | str, env: dict[str, str],
          setup: Callable[[], None] | None = None) -> int:
    """Fork, run ``setup`` in the child (namespaces, mounts), chdir, exec ``argv``: the PID.

    Failures before exec come back through a close-on-exec pipe as OverlayfuseError (setup)
    or CommandError (exec).  The forwarded signals stay blocked until the caller waits with
    ``wait_forwarding``, so none is lost between fork and handler installation; the child
    resets them to their defaults before exec.
    """
    if not argv:
        raise OverlayfuseError("no command to run")
    r, w = os.pipe2(os.O_CLOEXEC)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid == 0:
        stage = "S"
        try:
            os.close(r)
            for s in FORWARDED:
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if setup is not None:
                setup()
            os.chdir(cwd() if callable(cwd) else cwd)
            stage = "X"
            os.execvpe(argv[0], list(argv), env)
        except BaseException as e:
            err = getattr(e, "errno", 0) or 0
            text = getattr(e, "strerror", None) or str(e) or type(e).__name__
            try:
                os.write(w, f"{stage}{err} {text}".encode(errors="replace"))
            finally:
                os._exit(SETUP_FAILED)
        os._exit(SETUP_FAILED)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if msg:
        try:
            os.waitpid(pid, 0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        stage, rest = msg[0], msg[1:]
        num, _, text = rest.partition(" ")
        if stage == "X":
            status = 127 if int(num or 0) == errno.ENOENT else 126
            raise CommandError(f"cannot run {argv[0]}: {text}", status)
        raise OverlayfuseError(text)
    _pending_masks[pid] = old_mask
    return pid


_pending_masks: dict[int, object] = {}


def _terminal_sends_sigint() -> bool:
    """True when we run in the terminal's foreground group: Ctrl-C reaches the child too."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def wait_forwarding(pid: int) -> int:
    """Wait for ``pid``, forwarding SIGINT/SIGTERM/SIGHUP to it; its status as a shell gives it.

    A signal death becomes 128+signal.  SIGINT is not forwarded when the terminal already sent
    it to the whole foreground group (the child would get Ctrl-C twice).
    """
    old_mask = _pending_masks.pop(pid, None)
    in_main = threading.current_thread() is threading.main_thread()
    skip_int = _terminal_sends_sigint()
    old: dict[int, object] = {}

    def forward(sig: int, frame: object) -> None:
        if sig == signal.SIGINT and skip_int:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    try:
        if in_main:
            old = {s: signal.signal(s, forward) for s in FORWARDED}
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # type: ignore[arg-type]
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def merged_env(mountpoint: str, env: dict[str, str] | None) -> dict[str, str]:
    """The command's environment: ours (or ``env``) plus OVERLAYFUSE_MERGED."""
    out = dict(os.environ if env is None else env)
    out["OVERLAYFUSE_MERGED"] = mountpoint
    return out


def inside(mountpoint: str, cwd: str | None) -> str:
    """``cwd`` taken relative to the merged root (an absolute one too: it names a path in it)."""
    if not cwd:
        return mountpoint
    return os.path.join(mountpoint, cwd.lstrip("/"))


def run_dir() -> str:
    """Where throwaway mount points go: $XDG_RUNTIME_DIR when usable, else the temp dir."""
    d = os.environ.get("XDG_RUNTIME_DIR")
    if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
        return d
    return tempfile.gettempdir()


@contextlib.contextmanager
def run_mountpoint(mountpoint: str | None) -> Iterator[str]:
    """The mount point for ``run``: the given one, or a temp dir removed afterwards."""
    if mountpoint is not None:
        yield os.path.abspath(mountpoint)
        return
    mnt = tempfile.mkdtemp(prefix="overlayfuse-run-", dir=run_dir())
    try:
        yield mnt
    finally:
        try:
            os.rmdir(mnt)
        except OSError as e:
            log.warning("cannot remove mount point %s: %s", mnt, e)
