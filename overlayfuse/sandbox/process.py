"""Starting a command and waiting for it: the one fork/exec path of every ``run``.

Shared by the backends (a command in a merged view) and the sandbox (a command in its own
root): set-up failures before exec come back as one-line errors, the forwarded signals are never
lost between fork and handler, and a process may stay behind as a relay (the init of a PID
namespace must not be the command: the kernel drops signals that init has no handler for).
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Callable, Sequence

from ..errors import OverlayfuseError
from ..sysmount import set_pdeathsig


class CommandError(OverlayfuseError):
    """The command of ``run`` could not be started; ``status`` is the shell's code (126/127)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


SETUP_FAILED = 125  # run's own failure, as docker/podman report it
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_pending_masks: dict[int, object] = {}


def spawn(argv: Sequence[str], cwd: Callable[[], str] | str, env: dict[str, str],
          setup: Callable[[], None] | None = None,
          nested: Sequence[Callable[[], None]] = (), setup_only: bool = False) -> int:
    """Fork, run ``setup`` in the child (namespaces, mounts), chdir, exec ``argv``: the PID.
    With ``setup_only`` (and no ``argv``) the last step exits 0 instead of exec'ing.

    Each step of ``nested`` runs in a new child of the process before it, which stays behind as
    a relay (see ``_fork_relay``); the last one execs.  Failures before exec come back through a
    close-on-exec pipe as OverlayfuseError (set-up) or CommandError (exec).  The forwarded
    signals stay blocked until the caller waits with ``wait_forwarding``, and in the children
    until a relay waits or the command execs, so none is lost on the way (a PID namespace's
    init drops, rather than queues, an unblocked signal it has no handler for).
    """
    if not argv and not setup_only:
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
            # asked here, still in the caller's PID namespace: inside a new one the terminal's
            # foreground group is out of sight
            tty_sigint = _terminal_sends_sigint()
            if setup is not None:
                setup()
            for step in nested:
                _fork_relay(w, old_mask, tty_sigint)
                step()
            if setup_only:
                os._exit(0)
            os.chdir(cwd() if callable(cwd) else cwd)
            stage = "X"
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
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


def _fork_relay(report_fd: int, old_mask: object, tty_sigint: bool) -> None:
    """Fork; return in the child (the forwarded signals still blocked).  The parent closes its
    end of the report pipe (the caller of ``spawn`` reads it to its end) and relays: it
    forwards the signals, reaps every child, and exits with the status of this one.  The child
    dies with its relay (SIGKILL)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        set_pdeathsig(signal.SIGKILL)
        # the relay died before the line above (a new PID namespace's init sees ppid 0, so
        # there only a SIGKILL in this short window goes unnoticed)
        if os.getppid() not in (parent, 0):
            os._exit(SETUP_FAILED)
        return
    os.close(report_fd)
    _pending_masks[pid] = old_mask
    os._exit(wait_forwarding(pid, reap_all=True, tty_sigint=tty_sigint))


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


def wait_forwarding(pid: int, *, reap_all: bool = False, tty_sigint: bool | None = None) -> int:
    """Wait for ``pid``, forwarding SIGINT/SIGTERM/SIGHUP to it; its status as a shell gives it.

    A signal death becomes 128+signal.  SIGINT is not forwarded when the terminal already sent
    it to the whole foreground group (the child would get Ctrl-C twice; ``tty_sigint`` says
    so when known).  ``reap_all`` also reaps every other child meanwhile (an init must, or
    orphans stay zombies).
    """
    old_mask = _pending_masks.pop(pid, None)
    in_main = threading.current_thread() is threading.main_thread()
    skip_int = _terminal_sends_sigint() if tty_sigint is None else tty_sigint
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
                done, status = os.waitpid(-1 if reap_all else pid, 0)
            except InterruptedError:
                continue
            if done == pid:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
