"""Refuse a bad mount before anything is created: layers, mount point, FUSE prerequisites.

Every check here only looks (stat, listdir, /proc/self/mountinfo); the mount commands run it
first, so a refused mount leaves the disk exactly as it was.  Each failure is one
OverlayfuseError naming the path at fault.
"""
from __future__ import annotations

import os
import shutil
import stat

from .errors import OverlayfuseError
from .sysmount.fsinfo import topmost_mount
from .spec import OverlaySpec


def _inside(path: str, parent: str) -> bool:
    """``path`` is ``parent`` or lies below it (both absolute, resolved)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _require_dir(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OverlayfuseError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise OverlayfuseError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OverlayfuseError(f"{what} {path} is not a directory")
    return st


def mount_at(path: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount whose mount point is ``path``, else None.

    Read from /proc/self/mountinfo, which, unlike comparing st_dev with the parent, also sees a
    bind mount of a directory onto itself and a FUSE mount whose daemon hangs.
    """
    entry = topmost_mount(os.path.realpath(path))
    return (entry.fstype, entry.source) if entry is not None else None


def validate_layers(spec: OverlaySpec) -> None:
    """The layers exist, are directories, and do not overlap in ways overlayfs forbids."""
    for lower in spec.lowerdirs:
        _require_dir(lower, "lower dir")
    if (spec.upperdir is None) != (spec.workdir is None):
        raise OverlayfuseError("upperdir= and workdir= must be given together"
                               + (f" (upper dir {spec.upperdir} has no work dir)"
                                  if spec.upperdir else f" (work dir {spec.workdir} has no upper "
                                                        "dir)"))
    if spec.upperdir is None or spec.workdir is None:
        return
    upper, work = spec.upperdir, spec.workdir
    upper_st = _require_dir(upper, "upper dir")
    work_st = _require_dir(work, "work dir")
    # the work dir is where copy-ups are renamed from: rename(2) cannot cross filesystems
    if upper_st.st_dev != work_st.st_dev:
        raise OverlayfuseError(f"work dir {work} is on another filesystem than upper dir {upper}")
    if _inside(work, upper):
        where = "the upper dir" if work == upper else f"inside upper dir {upper}"
        raise OverlayfuseError(f"work dir {work} is {where}")
    if _inside(upper, work):
        raise OverlayfuseError(f"upper dir {upper} is inside work dir {work}")
    # a layer that sees another layer's insides would show the overlay's own private state
    for lower in spec.lowerdirs:
        for what, path in (("upper dir", upper), ("work dir", work)):
            if _inside(path, lower):
                raise OverlayfuseError(f"{what} {path} is inside lower dir {lower}")
            if _inside(lower, path):
                raise OverlayfuseError(f"lower dir {lower} is inside {what} {path}")


def validate_mountpoint(spec: OverlaySpec, mountpoint: str) -> None:
    """The mount point exists, is an empty directory outside every layer and not mounted on."""
    mnt = os.path.realpath(mountpoint)
    _require_dir(mnt, "mount point")
    layers = [("lower dir", p) for p in spec.lowerdirs]
    if spec.upperdir is not None:
        layers.append(("upper dir", spec.upperdir))
    if spec.workdir is not None:
        layers.append(("work dir", spec.workdir))
    for what, path in layers:
        # the daemon would be asked about its own layer through the mount: a loop
        if _inside(mnt, path):
            raise OverlayfuseError(f"mount point {mnt} is inside {what} {path}")
    mounted = mount_at(mnt)
    if mounted is not None:
        raise OverlayfuseError(f"mount point {mnt} is busy: {mounted[0]} is mounted there")
    try:
        entries = os.listdir(mnt)
    except OSError as e:
        raise OverlayfuseError(f"mount point {mnt}: {e.strerror}") from None
    if entries:
        raise OverlayfuseError(f"mount point {mnt} is not empty")


def validate(spec: OverlaySpec, mountpoint: str) -> None:
    """All the checks on layers and mount point; raises OverlayfuseError on the first failure."""
    validate_layers(spec)
    validate_mountpoint(spec, mountpoint)


def check_fuse_prerequisites() -> None:
    """/dev/fuse exists and, for a normal user, fusermount3 is on PATH (it does the mount)."""
    if not os.path.exists("/dev/fuse"):
        raise OverlayfuseError("/dev/fuse does not exist (is the fuse module loaded?)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise OverlayfuseError("fusermount3 not found on PATH (install fuse3): a normal user "
                               "needs it to mount")
