"""The interface every backend implements, and the handle a mount returns."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

# the fork/exec path moved down to the sandbox (its floor is below ours); re-exported here
from ..sandbox.process import SETUP_FAILED, CommandError, spawn, wait_forwarding
from ..spec import OverlaySpec

log = logging.getLogger(__name__)

Purpose = Literal["mount", "run"]

__all__ = ["Backend", "CommandError", "Mount", "Purpose", "SETUP_FAILED", "Verdict", "inside",
           "merged_env", "run_dir", "run_mountpoint", "spawn", "wait_forwarding"]


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
