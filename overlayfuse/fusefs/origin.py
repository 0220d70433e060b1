"""The kernel's ``origin``: which lower inode an upper entry was copied up from.

The value is the kernel's ``struct ovl_fb``: version 0, magic 0xfb, length, flags (0 on a
little-endian CPU), the lower file handle's type, the lower filesystem's UUID (as
FS_IOC_GETFSUUID reports it; all zeros where the filesystem has none) and the handle itself
(name_to_handle_at).  Written at copy-up, it lets the kernel's overlayfs keep inode numbers and
find the hard-link index of an upper this daemon wrote; its hex form names index entries.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_MAX_HANDLE = 128
_FS_IOC_GETFSUUID = 0x80111500
_VERSION, _MAGIC = 0, 0xFB
_FLAGS = 0 if sys.byteorder == "little" else 1


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _MAX_HANDLE)]


def fs_uuid(fd: int) -> bytes:
    """The filesystem UUID the kernel uses in file handles (16 zero bytes when it has none)."""
    buf = bytearray(17)
    try:
        probe = os.open(b"/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(probe, _FS_IOC_GETFSUUID, buf)
        finally:
            os.close(probe)
    except OSError:
        return bytes(16)
    return bytes(buf[1:1 + buf[0]]).ljust(16, b"\0")[:16]


def encode(dirfd: int, name: bytes, uuid: bytes) -> bytes | None:
    """The origin value for entry ``name`` in ``dirfd``; None where handles are unsupported."""
    handle = _FileHandle()
    handle.handle_bytes = _MAX_HANDLE
    mount_id = ctypes.c_int()
    # flags 0: a symlink itself is encoded, never its target
    if _libc.name_to_handle_at(dirfd, name or b"", ctypes.byref(handle), ctypes.byref(mount_id),
                               0x1000 if not name else 0) != 0:  # AT_EMPTY_PATH for the dir itself
        return None
    fid = bytes(handle.f_handle[:handle.handle_bytes])
    header = struct.pack("BBBBB", _VERSION, _MAGIC, 5 + 16 + len(fid), _FLAGS,
                         handle.handle_type & 0xFF)
    return header + uuid + fid


def index_name(origin: bytes) -> bytes:
    """The kernel's name for the index entry of the inode with this origin."""
    return origin.hex().encode()


def decode(value: bytes) -> tuple[int, bytes, bytes] | None:
    """(handle type, filesystem UUID, handle bytes) of an origin value, or None if malformed."""
    if len(value) < 21 or value[0] != _VERSION or value[1] != _MAGIC or value[2] != len(value):
        return None
    return value[4], value[5:21], value[21:]


def open_origin(value: bytes, mount_fd: int) -> int | None:
    """Open (O_PATH) the inode an origin names, on the filesystem of ``mount_fd``; needs
    CAP_DAC_READ_SEARCH, so it answers None for an unprivileged daemon."""
    parts = decode(value)
    if parts is None:
        return None
    handle_type, _uuid, fid = parts
    handle = _FileHandle()
    handle.handle_bytes = len(fid)
    handle.handle_type = handle_type
    ctypes.memmove(handle.f_handle, fid, len(fid))
    # the mount fd must be a real open file: an O_PATH fd is refused with EBADF
    mount = os.open(b"/proc/self/fd/%d" % mount_fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _libc.open_by_handle_at(mount, ctypes.byref(handle), os.O_PATH | os.O_CLOEXEC)
    finally:
        os.close(mount)
    return fd if fd >= 0 else None
