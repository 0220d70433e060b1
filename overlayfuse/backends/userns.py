"""The kernel-userns backend: overlayfs in a new user+mount namespace (``userxattr``).

Unprivileged and kernel-fast, but the mount exists only inside the namespace, so it serves
``run`` (a command that sees the merged tree) and never ``mount`` (an IDE would not see it).
"""
from __future__ import annotations

import os
from typing import Sequence

from ..probe import probe as run_probe
from ..probe import USERNS_MOUNT_REASON, probe_dir_for
from .. import sysmount
from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from .base import Backend, Mount, Purpose, Verdict
from .kernel import mount_or_explain, run_private


class UsernsBackend(Backend):
    name = "kernel-userns"

    def check(self, spec: OverlaySpec, purpose: Purpose) -> Verdict:
        return run_probe(probe_dir_for(spec)).verdict(self.name, purpose)

    def mount(self, spec: OverlaySpec, target: str) -> Mount:
        raise OverlayfuseError(f"backend kernel-userns cannot mount: {USERNS_MOUNT_REASON}")

    def run(self, spec: OverlaySpec, argv: Sequence[str], cwd: str | None = None, *,
            mountpoint: str | None = None, env: dict[str, str] | None = None,
            map_root: bool = False) -> int:
        """The caller's uid maps to itself (files stay the user's), or to root (``map_root``)."""
        uid, gid = os.geteuid(), os.getegid()

        def setup(spec: OverlaySpec, mnt: str) -> None:
            try:
                sysmount.unshare(sysmount.CLONE_NEWUSER | sysmount.CLONE_NEWNS)
            except OSError as e:
                raise OverlayfuseError("cannot create a user namespace: unshare(CLONE_NEWUSER) "
                                       f"failed: {os.strerror(e.errno or 0)}") from None
            sysmount.map_ids(0 if map_root else uid, uid, 0 if map_root else gid, gid)
            sysmount.make_rprivate()
            mount_or_explain(spec, mnt, userxattr=True,
                              who="kernel overlayfs in a user namespace")

        return run_private(spec, argv, cwd, mountpoint, env, setup)
