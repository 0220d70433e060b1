"""The kernel's mount machinery from Python: thin syscall wrappers (``syscalls``), read-only
facts about directories and the mount table (``fsinfo``), and mounting an overlay of any depth
on new kernels and old (``overlay``).

This package re-exports the names the rest of overlayfuse and the tests use as
``sysmount.NAME``.
"""
from __future__ import annotations

from .fsinfo import (DT_DIR, DT_REG, FS_MAGIC, dir_d_types, is_mountpoint, mount_fstype,
                     mounts_under, statfs_type)
from .overlay import (FSCONFIG_VALUE_LIMIT, PAGE_LIMIT, _mount_relative, empty_dir, legacy_data,
                      mount_overlay, overlay_option_pairs)
from .syscalls import (CLONE_NEWNS, CLONE_NEWUSER, MNT_DETACH, MNT_FORCE, MS_NODEV, MS_NOSUID,
                       MS_PRIVATE, MS_RDONLY, MS_REC, FsContext, make_rprivate, map_ids, mount,
                       set_pdeathsig, umount2, unshare)

__all__ = ["CLONE_NEWNS", "CLONE_NEWUSER", "DT_DIR", "DT_REG", "FSCONFIG_VALUE_LIMIT", "FS_MAGIC",
           "FsContext", "MNT_DETACH", "MNT_FORCE", "MS_NODEV", "MS_NOSUID", "MS_PRIVATE",
           "MS_RDONLY", "MS_REC", "PAGE_LIMIT", "_mount_relative", "dir_d_types", "empty_dir",
           "is_mountpoint", "legacy_data", "make_rprivate", "map_ids", "mount", "mount_fstype",
           "mount_overlay", "mounts_under", "overlay_option_pairs", "set_pdeathsig",
           "statfs_type", "umount2", "unshare"]
