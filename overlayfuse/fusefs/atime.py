"""Access times as the mount's option asks (noatime, relatime, strictatime).

The kernel's FUSE marks every inode S_NOATIME: it never updates an atime itself, so what
``stat`` shows is what the backing read did.  The kernel's overlayfs applies the overlay
mount's own atime option to upper files (ovl_update_time touches the upper inode through a
private mount without atime flags) and never touches a lower file.  Here: ``noatime`` reads
upper files with O_NOATIME; ``relatime`` (the default) leaves it to the upper filesystem's
mount, normally relatime too; ``strictatime`` reads upper files through a detached clone of
the upper root's mount (open_tree + mount_setattr, root only) whose atime mode is strict, so
the upper inode gets a new atime on every read and its ctime stays, and the kernel's page cache
is dropped at each open (keep_cache off) so every open's reads reach the daemon.
"""
from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Iterable

log = logging.getLogger(__name__)

MODES = ("noatime", "relatime", "strictatime")
DAEMON_ONLY = frozenset({"relatime", "strictatime"})  # libfuse refuses them as options

_SYS_OPEN_TREE, _SYS_MOUNT_SETATTR = 428, 442  # x86_64 and every arch with the new numbers
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_EMPTY_PATH = 1, 0o2000000, 0x1000
_MOUNT_ATTR__ATIME, _MOUNT_ATTR_STRICTATIME = 0x70, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


def mode_of(options: Iterable[str]) -> str:
    """The atime mode the options choose: the last of noatime/atime/relatime/strictatime."""
    mode = "relatime"
    for item in options:
        if item in MODES:
            mode = item
        elif item == "atime":
            mode = "relatime"
    return mode


def strict_clone(root_fd: int) -> int:
    """A detached clone of the mount holding ``root_fd``, rooted there, with strictatime; -1
    (logged) when the kernel or the caller's privileges do not allow it."""
    fd = _libc.syscall(_SYS_OPEN_TREE, root_fd, b"",
                       _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH)
    if fd < 0:
        log.warning("strictatime not honoured: open_tree: %s", os.strerror(ctypes.get_errno()))
        return -1
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_STRICTATIME,
                                                   _MOUNT_ATTR__ATIME, 0, 0), 32)
    if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, attr, 32) != 0:
        log.warning("strictatime not honoured: mount_setattr: %s",
                    os.strerror(ctypes.get_errno()))
        os.close(fd)
        return -1
    return fd
