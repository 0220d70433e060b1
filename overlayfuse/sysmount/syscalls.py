"""Thin ctypes wrappers for the mount-related syscalls Python 3.11 lacks.

mount(2)/umount2(2)/unshare(2) and the namespace set-up, and the new mount API (fsopen/fsconfig/
fsmount/move_mount, whose error log says *why* overlayfs refused, unlike mount(2)'s bare
EINVAL).  Every wrapper raises ``OSError`` with the errno, like ``os`` does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_FORCE = 1
MNT_DETACH = 2

# syscall numbers of the new mount API are the same on every architecture (asm-generic, 5.2+)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442
SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}.get(os.uname().machine, 217)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(os.uname().machine, 155)

FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x04
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 1

PR_SET_PDEATHSIG = 1

libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def check(ret: int, what: str, path: str | None = None) -> int:
    """``ret`` unless it is negative: then OSError with errno, like ``os`` raises."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def fsbytes(s: str | bytes | None) -> bytes | None:
    """A path or string as the bytes libc wants (None stays NULL)."""
    return os.fsencode(s) if s is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | bytes | None = None) -> None:
    """mount(2)."""
    ret = libc.mount(fsbytes(source), fsbytes(target), fsbytes(fstype), flags, fsbytes(data))
    check(ret, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    check(libc.umount2(fsbytes(target), flags), "umount", target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    check(libc.unshare(flags), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    check(libc.syscall(_SYS_PIVOT_ROOT, fsbytes(new_root), fsbytes(put_old)), "pivot_root",
          new_root)


def make_readonly_recursive(path: str) -> None:
    """mount_setattr(2) (5.12+): ``path``'s mount and every mount below it read-only, their
    other flags kept (a remount would have to repeat the flags a user namespace locks)."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # set, clear, propagation, userns
    ret = libc.syscall(_SYS_MOUNT_SETATTR, AT_FDCWD, fsbytes(path), AT_RECURSIVE,
                       ctypes.byref(attr), ctypes.sizeof(attr))
    check(ret, "mount_setattr", path)


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (prctl)."""
    check(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl")


def make_rprivate() -> None:
    """Stop mounts made in a fresh mount namespace from propagating back to the parent's."""
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)


def map_ids(inside_uid: int, outside_uid: int, inside_gid: int, outside_gid: int) -> None:
    """Write this process's one-line uid/gid maps right after unshare(CLONE_NEWUSER)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{inside_uid} {outside_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{inside_gid} {outside_gid} 1")


# -- new mount API --------------------------------------------------------------------------

class FsContext:
    """A filesystem context from fsopen(2): configure, create, attach, and read the kernel's log.

    The log (``messages()``) carries the kernel's reason for a refusal, e.g. ``overlayfs:
    filesystem on '/x' not supported as upperdir``; mount(2) only ever says EINVAL.
    """

    def __init__(self, fstype: str) -> None:
        self.fd = check(libc.syscall(_SYS_FSOPEN, fsbytes(fstype), FSOPEN_CLOEXEC), "fsopen")

    def set_string(self, key: str, value: str) -> None:
        ret = libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, fsbytes(key),
                           fsbytes(value), 0)
        self._check(ret, f"fsconfig {key}")

    def set_flag(self, key: str) -> None:
        ret = libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, fsbytes(key), None, 0)
        self._check(ret, f"fsconfig {key}")

    def create(self) -> None:
        ret = libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0)
        self._check(ret, "fsconfig create")

    def attach(self, target: str, mount_attrs: int = 0) -> None:
        """fsmount(2) + move_mount(2) onto ``target`` in the caller's mount namespace."""
        mfd = self._check(libc.syscall(_SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, mount_attrs),
                          "fsmount")
        try:
            ret = libc.syscall(_SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, fsbytes(target),
                                MOVE_MOUNT_F_EMPTY_PATH)
            check(ret, "move_mount", target)
        finally:
            os.close(mfd)

    def messages(self) -> list[str]:
        """Drain the kernel's log for this context ("e ..." errors, "w ..." warnings)."""
        out: list[str] = []
        while True:
            try:
                msg = os.read(self.fd, 4096)
            except OSError:
                break
            if not msg:
                break
            out.append(msg.decode(errors="replace"))
        return out

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            log = [m[2:].strip() for m in self.messages() if m[:2] in ("e ", "w ")]
            detail = "; ".join(log) if log else os.strerror(err)
            raise OSError(err, f"{what}: {detail}")
        return ret

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FsContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
