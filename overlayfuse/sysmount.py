"""Thin ctypes wrappers for the mount-related syscalls Python 3.11 lacks.

mount(2)/umount2(2)/unshare(2), the new mount API (fsopen/fsconfig/fsmount/move_mount, whose
error log says *why* overlayfs refused, unlike mount(2)'s bare EINVAL), statfs(2)'s f_type and
getdents64(2)'s d_type.  Every wrapper raises ``OSError`` with the errno, like ``os`` does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Sequence

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
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
_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}.get(os.uname().machine, 217)

FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x04
AT_FDCWD = -100

PR_SET_PDEATHSIG = 1

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _b(s: str | bytes | None) -> bytes | None:
    return os.fsencode(s) if s is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | bytes | None = None) -> None:
    """mount(2)."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), "umount", target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (prctl)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl")


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
        self.fd = _check(_libc.syscall(_SYS_FSOPEN, _b(fstype), FSOPEN_CLOEXEC), "fsopen")

    def set_string(self, key: str, value: str) -> None:
        ret = _libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, _b(key), _b(value), 0)
        self._check(ret, f"fsconfig {key}")

    def set_flag(self, key: str) -> None:
        ret = _libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, _b(key), None, 0)
        self._check(ret, f"fsconfig {key}")

    def create(self) -> None:
        ret = _libc.syscall(_SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0)
        self._check(ret, "fsconfig create")

    def attach(self, target: str, mount_attrs: int = 0) -> None:
        """fsmount(2) + move_mount(2) onto ``target`` in the caller's mount namespace."""
        mfd = self._check(_libc.syscall(_SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, mount_attrs),
                          "fsmount")
        try:
            ret = _libc.syscall(_SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, _b(target),
                                MOVE_MOUNT_F_EMPTY_PATH)
            _check(ret, "move_mount", target)
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


# -- facts about a directory ----------------------------------------------------------------

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
    _check(_libc.statfs(_b(path), buf), "statfs", path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mount_fstype(path: str) -> str | None:
    """The fs type named in /proc/self/mountinfo for the mount holding ``path`` (by st_dev)."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] != want:
                continue
            sep = fields.index("-")
            found = fields[sep + 1]   # last match wins: the topmost mount of that device
    return found


def dir_d_types(path: str) -> dict[str, int]:
    """Name -> d_type of the entries of ``path`` as getdents64(2) returns them (0 = unknown)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    out: dict[str, int] = {}
    buf = ctypes.create_string_buffer(32768)
    try:
        while True:
            n = _check(_libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf)), "getdents64", path)
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
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def _unescape(s: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for space, ...)."""
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


# -- mounting an overlay ---------------------------------------------------------------------

PAGE_LIMIT = 4095           # mount(2) copies at most one page of options, NUL included
FSCONFIG_VALUE_LIMIT = 255  # fsconfig(2) copies at most 256 bytes per string value


def overlay_option_pairs(lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
                         options: Sequence[tuple[str, str | None]] = (), volatile: bool = False,
                         userxattr: bool = False) -> list[tuple[str, str | None]]:
    """The non-lowerdir options of an overlay mount, in the order the kernel expects."""
    pairs: list[tuple[str, str | None]] = []
    if upperdir is not None:
        pairs += [("upperdir", upperdir), ("workdir", workdir)]
    for key, value in options:
        if key in ("lowerdir", "lowerdir+", "upperdir", "workdir", "volatile", "userxattr"):
            continue
        pairs.append((key, value))
    if volatile and upperdir is not None:
        pairs.append(("volatile", None))
    if userxattr:
        pairs.append(("userxattr", None))
    return pairs


def _escape(path: str) -> str:
    """Escape a path for mount(2)'s monolithic overlay option string."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def legacy_data(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]]) -> str:
    """mount(2)'s option string: ``lowerdir=A:B,upperdir=U,...``."""
    items = ["lowerdir=" + ":".join(_escape(p) for p in lowerdirs)]
    for key, value in pairs:
        if value is None:
            items.append(key)
        elif key in ("upperdir", "workdir", "datadir"):
            items.append(f"{key}={_escape(value)}")
        else:
            items.append(f"{key}={value}")
    return ",".join(items)


def mount_overlay(lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
                  target: str, options: Sequence[tuple[str, str | None]] = (),
                  volatile: bool = False, userxattr: bool = False) -> None:
    """Mount an overlay on ``target`` in the current mount namespace, any number of layers.

    The new mount API adds one lower per ``lowerdir+`` call (Linux 6.8+), so no page limit
    applies, and its log gives the kernel's reason for a refusal.  A path longer than fsconfig's
    256-byte value limit is passed as ``/proc/self/fd/N`` of an O_PATH descriptor.  Older kernels
    get mount(2); when the option string exceeds a page, a child process chdirs to the layers'
    common parent and mounts with relative paths (what container storage libraries do).
    Raises ``OSError`` whose message carries the kernel's reason when it gave one.
    """
    if not lowerdirs:
        raise OSError(errno.EINVAL, "an overlay needs at least one lower dir")
    if upperdir is None and len(lowerdirs) == 1:
        # overlayfs wants two lowers when it has no upper: pad with an empty dir.  It must
        # outlive the mount (a deleted lower root reads as empty), so one per user is kept.
        lowerdirs = [lowerdirs[0], empty_dir()]
    pairs = overlay_option_pairs(lowerdirs, upperdir, workdir, options, volatile, userxattr)
    try:
        _mount_fsconfig(lowerdirs, pairs, target)
        return
    except _NoNewAPI:
        pass
    data = legacy_data(lowerdirs, pairs)
    if len(data.encode()) <= PAGE_LIMIT:
        mount("overlay", target, "overlay", 0, data)
    else:
        _mount_relative(lowerdirs, pairs, target)


def empty_dir() -> str:
    """A per-user empty, read-only directory in the temp dir (made once, never removed)."""
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"overlayfuse-empty-{os.geteuid()}")
    for _ in range(2):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path, 0o555)
            except FileExistsError:
                pass
            continue
        import stat as _stat
        if (_stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
                and not os.listdir(path)):
            return path
        break
    # someone else's or not empty: a fresh one (left behind: an empty dir is harmless)
    path = tempfile.mkdtemp(prefix="overlayfuse-empty-")
    os.chmod(path, 0o555)
    return path


class _NoNewAPI(Exception):
    pass


def _mount_fsconfig(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                    target: str) -> None:
    try:
        ctx = FsContext("overlay")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _NoNewAPI() from e
        raise
    fds: list[int] = []

    def short(path: str) -> str:
        if len(os.fsencode(path)) <= FSCONFIG_VALUE_LIMIT:
            return path
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        fds.append(fd)
        return f"/proc/self/fd/{fd}"

    try:
        ctx.set_string("source", "overlay")
        for i, lower in enumerate(lowerdirs):
            try:
                ctx.set_string("lowerdir+", short(lower))
            except OSError as e:
                # kernels before 6.8 know fsopen but not "lowerdir+"
                if i == 0 and e.errno == errno.EINVAL and "nknown parameter" in str(e):
                    raise _NoNewAPI() from e
                raise
        for key, value in pairs:
            if value is None:
                ctx.set_flag(key)
            elif key in ("upperdir", "workdir", "datadir+"):
                ctx.set_string(key, short(value))
            else:
                ctx.set_string(key, value)
        ctx.create()
        ctx.attach(target)
    finally:
        ctx.close()
        for fd in fds:
            os.close(fd)


def _mount_relative(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                    target: str) -> None:
    """mount(2) with short relative layer paths, from a child process with its own cwd.

    First choice: cwd at the layers' common parent (what container storage libraries do).  When
    even that exceeds the page, cwd in a temporary directory of symlinks with 1-2 character
    names (base 36), one per layer; overlayfs follows them when it resolves the layers, and
    they are removed once the mount exists.  A child, because chdir is process-wide and the
    caller may have threads; it shares our mount namespace, so its mount is ours.
    """
    dirkeys = ("upperdir", "workdir")
    paths = [os.path.abspath(p) for p in lowerdirs]
    paths += [os.path.abspath(v) for k, v in pairs if k in dirkeys and v]
    base = os.path.commonpath(paths)
    rel = {p: os.path.relpath(p, base) for p in paths}
    data = legacy_data([rel[os.path.abspath(p)] for p in lowerdirs],
                       [(k, rel[os.path.abspath(v)] if k in dirkeys and v else v)
                        for k, v in pairs])
    if len(data.encode()) <= PAGE_LIMIT:
        _mount_from(base, data, target)
        return
    import tempfile
    farm = tempfile.mkdtemp(prefix="overlayfuse-layers-")
    try:
        short: dict[str, str] = {}
        for i, p in enumerate(dict.fromkeys(paths)):
            short[p] = _base36(i)
            os.symlink(p, os.path.join(farm, short[p]))
        data = legacy_data([short[os.path.abspath(p)] for p in lowerdirs],
                           [(k, short[os.path.abspath(v)] if k in dirkeys and v else v)
                            for k, v in pairs])
        if len(data.encode()) > PAGE_LIMIT:
            raise OSError(errno.E2BIG, f"{len(lowerdirs)} layers do not fit in mount(2)'s "
                          "one page of options even with 2-character names")
        _mount_from(farm, data, target)
    finally:
        for name in os.listdir(farm):
            os.unlink(os.path.join(farm, name))
        os.rmdir(farm)


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return out


def _mount_from(cwd: str, data: str, target: str) -> None:
    """mount(2) an overlay from a forked child whose cwd is ``cwd``; errors come back as OSError."""
    target = os.path.abspath(target)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, never back into the caller's code
        try:
            os.close(r)
            os.chdir(cwd)
            mount("overlay", target, "overlay", 0, data)
            os._exit(0)
        except BaseException as e:
            err = getattr(e, "errno", None) or errno.EIO
            os.write(w, f"{err} {getattr(e, 'strerror', None) or e}".encode())
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    if msg:
        num, _, text = msg.partition(" ")
        raise OSError(int(num), text, target)
