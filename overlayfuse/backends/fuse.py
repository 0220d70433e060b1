"""The fuse backend: the overlayfuse daemon (pyfuse3 + trio), seen by all the user's processes."""
from __future__ import annotations

import logging
import os
from typing import Sequence

from ..probe import probe as run_probe
from ..probe import deferred_signals, fuse_preconditions, probe_dir_for, unmount_fuse
from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from .base import (Backend, Mount, Purpose, Verdict, inside, merged_env, run_mountpoint, spawn,
                   wait_forwarding)

log = logging.getLogger(__name__)


def transport_note(spec: OverlaySpec | None = None) -> str:
    """How the daemon talks to the kernel (fusefs/transport.py), for ``check`` and -v."""
    try:
        from ..fusefs import transport
    except ImportError as e:
        return f"unavailable: {e}"
    return transport.describe(spec is not None and "zero_opens" in spec.fuse_option_map())


class FuseBackend(Backend):
    name = "fuse"

    def check(self, spec: OverlaySpec, purpose: Purpose) -> Verdict:
        why_not = fuse_preconditions()
        if why_not:
            return Verdict(False, why_not)
        return run_probe(probe_dir_for(spec)).verdict(self.name, purpose)

    def mount(self, spec: OverlaySpec, target: str, *, fuse_options: Sequence[str] = (),
              debug: bool = False) -> Mount:
        """Start the daemon in the background; returns once the mount is ready."""
        try:
            from ..fusefs.daemon import mount_fuse
        except ImportError as e:
            raise OverlayfuseError(f"the FUSE daemon cannot load: {e}") from None
        target = os.path.abspath(target)
        pid = None
        try:
            with deferred_signals():  # a signal must not fall between mount and handle
                pid = mount_fuse(spec, target, fuse_options=fuse_options, debug=debug)
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
