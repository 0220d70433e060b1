"""How a copy-up's data is made durable before the rename that replaces the lower entry.

The promise (as the kernel's overlayfs, which fsyncs each copy-up): after a crash the merged
tree shows the old file or the whole new one.  What that takes depends on the upper
filesystem, found once per mount:

- ``range``, journalled ext4 and xfs: ``sync_file_range`` writes the copy's pages and waits
  for their completion (on ext4 after the unwritten-extent conversion, on xfs after the size
  update, both of which end before the pages' writeback does).  The block allocation, the size,
  owner, mode and xattrs are journalled metadata in the transaction that is running then or an
  earlier one, and the rename goes into that transaction or a later one: the journal commits
  them in order, and its commit flushes the device cache before the commit record.  So a
  rename that survived the crash comes with the whole copy.  Not a POSIX promise; ext4 without
  a journal does not give it (no order at all between the inode, the data and the rename).
- ``none``, tmpfs and ramfs: nothing survives a crash, a sync has nothing to keep.
- ``fsync`` everywhere else (ext4 without a journal, btrfs, f2fs, nfs, ...): fsync, as the
  kernel does.

``volatile`` is the only way to skip it (``Overlay``'s spec says so before this is asked).
"""
from __future__ import annotations

import ctypes
import logging
import os

from ..sysmount.fsinfo import FS_MAGIC, statfs_type
from ..sysmount.syscalls import libc

log = logging.getLogger(__name__)

FSYNC, RANGE, NONE = "fsync", "range", "none"
# "fsync": fsync every copy-up whatever the upper filesystem (to compare; never weaker)
FORCE_ENV = "OVERLAYFUSE_COPY_SYNC"
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_sync_file_range = libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int


def mode_of(upper_root_fd: int) -> str:
    """The durability mode for copy-ups into the upper layer whose root is ``upper_root_fd``."""
    if os.environ.get(FORCE_ENV) == FSYNC:
        return FSYNC
    path = f"/proc/self/fd/{upper_root_fd}"
    try:
        fstype = FS_MAGIC.get(statfs_type(path), "")
    except OSError as e:
        log.debug("copy-ups fsync'ed: statfs of the upper failed: %s", e)
        return FSYNC
    if fstype in ("tmpfs", "ramfs"):
        return NONE
    if fstype == "xfs" or (fstype == "ext4" and _ext4_journalled(os.fstat(upper_root_fd).st_dev)):
        return RANGE
    return FSYNC


def _ext4_journalled(dev: int) -> bool:
    """ext2, ext3 and ext4 share a magic; only one with a journal (jbd2) orders the rename
    after the copy's metadata.  The kernel names the filesystem after its block device."""
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
        with open(f"/sys/fs/ext4/{name}/journal_task", encoding="ascii") as f:
            task = f.read().strip()
    except OSError as e:
        log.debug("copy-ups fsync'ed: cannot tell whether the ext4 upper has a journal: %s", e)
        return False
    return bool(task) and task != "<none>"


def make_durable(fd: int, mode: str) -> None:
    """Make the copy behind ``fd`` durable as ``mode`` says, before its rename."""
    if mode == RANGE:
        if _sync_file_range(fd, 0, 0, _WAIT_BEFORE | _WRITE | _WAIT_AFTER) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    elif mode == FSYNC:
        os.fsync(fd)
