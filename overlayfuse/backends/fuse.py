"""The fuse backend: the overlayfuse daemon (pyfuse3 + trio), seen by all the user's processes."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from ..probe import probe as run_probe
from ..probe import deferred_signals, fuse_preconditions, probe_dir_for, unmount_fuse
from ..errors import OverlayfuseError
from ..fusefs import atime
from ..spec import OverlaySpec, last_wins
from .base import (Backend, Mount, Purpose, Verdict, inside, merged_env, run_mountpoint, spawn,
                   wait_forwarding)

log = logging.getLogger(__name__)


# harmless options libfuse takes as they are (the flag pairs come from spec.last_wins)
FUSE_PASSED = frozenset({"dirsync", "allow_other", "default_permissions"})
FUSE_PASSED_KEYS = frozenset({"max_read"})


def fuse_mount_options(other: Sequence[str] = (), as_root: bool | None = None) -> list[str]:
    """The libfuse mount options for the harmless options given (plus root's defaults).

    As root, ``allow_other`` and ``default_permissions`` are on, as with fuse-overlayfs: a
    container's processes run under many uids.  As root devices and setuid bits work unless
    ``nodev``/``nosuid`` is given, as on the kernel's overlay (libfuse would add both: a build
    chroot on the merged tree could not open its own /dev/null); for a normal user
    fusermount3 refuses ``dev``/``suid`` anyway.
    """
    if as_root is None:
        as_root = os.geteuid() == 0
    opts: list[str] = ["allow_other", "default_permissions"] if as_root else []
    chosen = last_wins(other)
    if as_root:
        chosen.setdefault("nodev", "dev")
        chosen.setdefault("nosuid", "suid")
    for item in chosen.values():
        if item in ("dev", "suid") and not as_root:
            continue
        if item not in ("rw", "async", "atime", "exec"):  # the defaults: nothing to say
            opts.append(item)
    if atime.mode_of(other) == "strictatime":
        opts.append("strictatime")  # for the daemon (fusefs/atime.py); libfuse never sees it
    for item in other:
        key = item.partition("=")[0]
        if (item in FUSE_PASSED or key in FUSE_PASSED_KEYS) and item not in opts:
            opts.append(item)
    return opts


def transport_note(spec: OverlaySpec | None = None) -> str:
    """How the daemon talks to the kernel (fusefs/transport.py), for ``check`` and -v."""
    try:
        from ..fusefs import transport
    except ImportError as e:
        return f"unavailable: {e}"
    opts = spec.fuse_option_map() if spec is not None else {}
    spin = opts.get("spin")
    return transport.describe("zero_opens" in opts,
                              int(spin) if spin and spin.isdigit() else transport.DEFAULT_SPIN_US)


class FuseBackend(Backend):
    name = "fuse"

    def check(self, spec: OverlaySpec, purpose: Purpose) -> Verdict:
        why_not = fuse_preconditions()
        if why_not:
            return Verdict(False, why_not)
        return run_probe(probe_dir_for(spec)).verdict(self.name, purpose)

    def mount(self, spec: OverlaySpec, target: str, *,
              fuse_options: Sequence[str] | None = None, debug: bool = False,
              control: tuple[str, dict[str, int]] | None = None) -> Mount:
        """Start the daemon in the background; returns once the mount is ready.  Without
        ``fuse_options``, those of a plain ``overlayfuse mount`` (as root: allow_other, dev,
        suid, so that every user sees it, as a kernel overlay).  ``control``: (socket path,
        {name: lock fd}): where the daemon takes requests to switch layers, and the lock fds
        it holds, by name, until a switch replaces them (fusefs/control.py)."""
        if fuse_options is None:
            fuse_options = fuse_mount_options()
        try:
            from ..fusefs.control import Control
            from ..fusefs.daemon import mount_fuse
        except ImportError as e:
            raise OverlayfuseError(f"the FUSE daemon cannot load: {e}") from None
        target = os.path.abspath(target)
        pid = None
        try:
            with deferred_signals():  # a signal must not fall between mount and handle
                pid = mount_fuse(spec, target, fuse_options=fuse_options, debug=debug,
                                 control=Control(*control) if control else None)
        except BaseException:
            if pid is not None:
                unmount_fuse(target, pid)
            raise
        return Mount(self.name, target, spec, lambda: unmount_fuse(target, pid), pid=pid)

    def run(self, spec: OverlaySpec, argv: Sequence[str], cwd: str | None = None, *,
            mountpoint: str | None = None, env: dict[str, str] | None = None,
            map_root: bool = False) -> int:
        """Mount in the caller's namespace (no private one is to be had), run, always unmount."""
        if map_root:
            raise OverlayfuseError("backend fuse cannot map the caller to root")
        with run_mountpoint(mountpoint) as mnt, self.mount(spec, mnt):
            pid = spawn(argv, inside(mnt, cwd), merged_env(mnt, env))
            return wait_forwarding(pid)
