"""The probe's scratch dirs: made with the prober's PID in the name, removed after the probe,
and removed by a later probe when the prober was killed.

Also the removal that gets through what overlayfs leaves behind (mode 000 work dirs), which
``run`` uses for its own temporary layers.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from typing import Callable

from .. import sysmount
from .unmount import unmount_fuse

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".overlayfuse-probe-"
_SCRATCH_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-[0-9a-f]+$")


def make_scratch(directory: str) -> str:
    """A new scratch dir in ``directory``, named after this process so a later probe knows
    whether its owner is still alive."""
    path = os.path.join(directory, f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    return path


def remove_stale_scratch(directory: str) -> None:
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
        remove_scratch(os.path.join(directory, name))


def remove_scratch(path: str) -> None:
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
