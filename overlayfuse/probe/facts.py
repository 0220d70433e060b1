"""What the probe learns about the kernel and the directory, independent of any backend.

Kept apart from the trials: these facts explain a trial's verdict (no whiteouts, no xattrs on
this filesystem) but never decide it.
"""
from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field

from .. import sysmount


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


def base_facts(directory: str) -> Facts:
    """The kernel (uname), the user, and the filesystem type and device of ``directory``."""
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


def fs_facts(scratch: str, facts: Facts) -> None:
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
