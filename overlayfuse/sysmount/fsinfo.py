"""Facts about a directory and the mount table: the filesystem's magic and type, getdents64's
d_type, and which mount points lie below a path (from /proc/self/mountinfo).

Read-only questions, kept apart from the syscalls that change mounts.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import NamedTuple

from .syscalls import SYS_GETDENTS64, check, fsbytes, libc

FS_MAGIC = {
    0xEF53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs", 0x9123683E: "btrfs",
    0x794C7630: "overlay", 0x65735546: "fuse", 0x6969: "nfs", 0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs", 0x73717368: "squashfs", 0x858458F6: "ramfs", 0x4D44: "vfat",
    0xFF534D42: "cifs", 0xFE534D42: "smb2", 0xF15F: "ecryptfs", 0x01021997: "9p",
    0x00C36400: "ceph", 0xCA451A4E: "bcachefs", 0x5346544E: "ntfs", 0x2011BAB0: "exfat",
    0x9FA0: "proc", 0x62656572: "sysfs",
}


def statfs_type(path: str) -> int:
    """statfs(2)'s f_type (the filesystem magic); every Linux ABI puts it first."""
    buf = ctypes.create_string_buffer(256)
    check(libc.statfs(fsbytes(path), buf), "statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo, unescaped."""

    device: str       # "major:minor" of the mounted filesystem
    mountpoint: str
    fstype: str
    source: str
    options: str = ""  # the filesystem's own (super block) options, still escaped


def mount_table() -> list[MountEntry]:
    """This namespace's mounts from /proc/self/mountinfo, oldest first (a later mount on the
    same point covers an earlier one); the one parser every mountinfo reader here uses."""
    out: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, rfields = left.split(" "), right.split(" ")
            if len(fields) > 4:
                out.append(MountEntry(fields[2], unescape_mountinfo(fields[4]), rfields[0],
                                      unescape_mountinfo(rfields[1]) if len(rfields) > 1 else "",
                                      rfields[2] if len(rfields) > 2 else ""))
    return out


def topmost_mount(mountpoint: str) -> MountEntry | None:
    """The newest mount whose mount point is ``mountpoint``, an already resolved path: no
    path walk happens here, so a daemon may ask about its own mount before it serves."""
    found = None
    for entry in mount_table():
        if entry.mountpoint == mountpoint:
            found = entry
    return found


def mount_fstype(path: str) -> str | None:
    """The fs type named in /proc/self/mountinfo for the mount holding ``path`` (by st_dev)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = None
    for entry in mount_table():
        if entry.device == want:
            found = entry.fstype  # last match wins: the topmost mount of that device
    return found


def dir_d_types(path: str) -> dict[str, int]:
    """Name -> d_type of the entries of ``path`` as getdents64(2) returns them (0 = unknown)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    out: dict[str, int] = {}
    buf = ctypes.create_string_buffer(32768)
    try:
        while True:
            n = check(libc.syscall(SYS_GETDENTS64, fd, buf, len(buf)), "getdents64", path)
            if n == 0:
                return out
            raw = buf.raw[:n]
            off = 0
            while off < n:
                _ino, _doff, reclen, dtype = struct.unpack_from("<QqHB", raw, off)
                name = raw[off + 19:off + reclen].split(b"\0", 1)[0]
                out[os.fsdecode(name)] = dtype
                off += reclen
    finally:
        os.close(fd)


DT_DIR = 4
DT_REG = 8


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` in this namespace, deepest first."""
    prefix = prefix.rstrip("/")
    out = [entry.mountpoint for entry in mount_table()
           if entry.mountpoint == prefix or entry.mountpoint.startswith(prefix + "/")]
    return sorted(out, key=len, reverse=True)


def unescape_mountinfo(s: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for space, ...); the one copy every reader uses."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def is_mountpoint(path: str) -> bool:
    """True if ``path`` is a mount point in this namespace (per mountinfo, works for FUSE)."""
    real = os.path.realpath(path)
    return real in mounts_under(real)
