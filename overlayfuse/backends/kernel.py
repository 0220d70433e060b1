"""The kernel backend: overlayfs mounted with mount(2) in the caller's mount namespace (root)."""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Callable, Sequence

from ..probe import probe as run_probe
from ..probe import deferred_signals, probe_dir_for
from .. import sysmount
from ..errors import OverlayfuseError
from ..fusefs import inuse
from ..spec import OverlaySpec
from ..survey import adapt, record_kernel_features
from .base import (Backend, Mount, Purpose, Verdict, inside, merged_env, run_mountpoint, spawn,
                   wait_forwarding)

log = logging.getLogger(__name__)


def mount_spec(spec: OverlaySpec, target: str, *, userxattr: bool = False) -> None:
    """Mount ``spec`` with overlayfs on ``target`` in the current namespace (OSError on refusal;
    OverlayfuseError where a FUSE daemon holds the upper or work dir, inuse.py).

    As root the options are first adapted to what the layers hold (survey.adapt: index=on for
    an upper with a hard-link index, userxattr for a user's markers), and the upper's record
    learns what these options let the kernel write there.
    """
    if not userxattr:
        spec = adapt(spec, "kernel")
    # a live FUSE daemon's upper or work dir: refused as the kernel refuses its own (the
    # kernel's in-use mark is not the daemon's lock, so it would not see that mount)
    inuse.release(inuse.claim(spec, kernel_mounts=False))
    userxattr = userxattr or spec.userxattr
    record_kernel_features(spec, userxattr)
    sysmount.mount_overlay(spec.lowerdirs, spec.upperdir, spec.workdir, target,
                           options=spec.options, volatile=spec.volatile, userxattr=userxattr)


def umount_retrying(target: str) -> None:
    """umount2, retrying a busy mount briefly, then detaching it: nothing may stay mounted."""
    for _ in range(20):
        try:
            sysmount.umount2(target)
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                return
            if e.errno != errno.EBUSY:
                raise
        time.sleep(0.05)
    log.warning("%s still busy: detaching it lazily", target)
    sysmount.umount2(target, sysmount.MNT_DETACH)


class KernelBackend(Backend):
    name = "kernel"

    def check(self, spec: OverlaySpec, purpose: Purpose) -> Verdict:
        return run_probe(probe_dir_for(spec)).verdict(self.name, purpose)

    def mount(self, spec: OverlaySpec, target: str) -> Mount:
        target = os.path.abspath(target)
        mounted = False
        try:
            with deferred_signals():  # a signal must not fall between mount and handle
                mount_spec(spec, target)
                mounted = True
        except OSError as e:
            raise refusal("kernel overlayfs", target, spec, e) from None
        except BaseException:
            if mounted:
                umount_retrying(target)
            raise
        return Mount(self.name, target, spec, lambda: umount_retrying(target))

    def run(self, spec: OverlaySpec, argv: Sequence[str], cwd: str | None = None, *,
            mountpoint: str | None = None, env: dict[str, str] | None = None,
            map_root: bool = False) -> int:
        """Mount in a private mount namespace of the command's own: it vanishes with it."""

        def setup(spec: OverlaySpec, mnt: str) -> None:
            sysmount.unshare(sysmount.CLONE_NEWNS)
            sysmount.make_rprivate()
            mount_or_explain(spec, mnt, userxattr=False, who="kernel overlayfs")

        return run_private(spec, argv, cwd, mountpoint, env, setup)


def refusal(who: str, mnt: str, spec: OverlaySpec, e: OSError) -> OverlayfuseError:
    """The one-line error for a refused kernel mount.  The kernel tells why in its log where it
    can (FsContext); EBUSY for a dir in use it prints to dmesg only, so that is said here."""
    why = e.strerror or str(e)
    if e.errno == errno.EBUSY and spec.upperdir is not None:
        why += (" (upperdir or workdir in use by another mount: the kernel refuses a second "
                "one while the index is on)")
    return OverlayfuseError(f"{who} refused to mount on {mnt}: {why}")


def mount_or_explain(spec: OverlaySpec, mnt: str, *, userxattr: bool, who: str) -> None:
    """``mount_spec``, a refusal made one OverlayfuseError line naming ``who`` refused (the
    run backends' and the store's rooted runs' mount, inside their own namespaces)."""
    try:
        mount_spec(spec, mnt, userxattr=userxattr)
    except OSError as e:
        raise refusal(who, mnt, spec, e) from None


def run_private(spec: OverlaySpec, argv: Sequence[str], cwd: str | None,
                mountpoint: str | None, env: dict[str, str] | None,
                setup: Callable[[OverlaySpec, str], None]) -> int:
    """Fork; the child makes its namespace and mount (``setup(spec, mnt)``), execs ``argv``."""
    if spec.upperdir is None and len(spec.lowerdirs) == 1:
        # pad here, not in the child: inside a user namespace our uid is another
        spec = OverlaySpec(lowerdirs=(spec.lowerdirs[0], sysmount.empty_dir()),
                           options=spec.options)
    with run_mountpoint(mountpoint) as mnt:
        if not os.path.isdir(mnt):
            raise OverlayfuseError(f"mount point {mnt} is not a directory")
        pid = spawn(argv, inside(mnt, cwd), merged_env(mnt, env),
                    lambda: setup(spec, mnt))
        return wait_forwarding(pid)
