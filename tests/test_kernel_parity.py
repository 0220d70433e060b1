"""Causes of xfstests failures, each checked against the kernel's overlayfs on the same steps.

A root mount allows devices and setuid files unless ``nodev``/``nosuid`` is asked for, as the
kernel's overlay does; ``mount -o remount,ro`` (which mount.fuse3 turns into the drop-in form
with ``remount`` among the options) makes the mount read-only and back; a rename over an open
file leaves that file readable through its descriptor; an O_DIRECT write is seen by a buffered
read that had the old data cached; a read leaves a lower file's atime alone and updates an
upper file's as relatime does; POSIX ACLs on the layers grant and deny access to another user;
an open file whose last name is gone keeps its xattrs and takes writes; a file handle
(``name_to_handle_at``) still opens its file or directory once the kernel evicted the inode
(the kernel's overlay with ``nfs_export=on``), and a deleted file's handle is stale.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from helpers import aio_pwrite, outcome, ovf
from mounts import kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root")


@contextlib.contextmanager
def both(tmp_path: Path, extra: tuple[str, ...] = (),
         lower_atime: float | None = None,
         kernel_extra: tuple[str, ...] = ()) -> Iterator[list[tuple[str, Path]]]:
    """A kernel overlay and an overlayfuse mount over copies of the same one-file lower."""
    k, f = make_layers(tmp_path / "k", 1), make_layers(tmp_path / "f", 1)
    for layers in (k, f):
        low = layers.lowers[0] / "low"
        low.write_bytes(b"lower\n")
        if lower_atime is not None:
            os.utime(low, (lower_atime, time.time()))
    kopts = ",".join(("redirect_dir=on", "index=on") + extra + kernel_extra)
    with kernel_overlay(k.lowers, k.upper, k.work, k.mnt, kopts), \
            overlayfuse_mount(f.lowers, f.upper, f.work, f.mnt, extra=extra):
        yield [("kernel", k.mnt), ("overlayfuse", f.mnt)]


def same(mounts: list[tuple[str, Path]], fn: Callable[[Path], Any]) -> Any:
    results = {name: fn(mnt) for name, mnt in mounts}
    assert results["overlayfuse"] == results["kernel"], results
    return results["kernel"]


def _flags(mnt: Path) -> set[str]:
    f = os.statvfs(mnt).f_flag
    return {name for bit, name in ((os.ST_RDONLY, "ro"), (os.ST_NODEV, "nodev"),
                                   (os.ST_NOSUID, "nosuid")) if f & bit} or {"rw"}


def _null_device(mnt: Path) -> Any:
    os.mknod(mnt / "null", 0o666 | 0o020000, os.makedev(1, 3))
    return outcome(lambda: os.close(os.open(mnt / "null", os.O_WRONLY)))


def test_root_mount_allows_devices_and_setuid_like_the_kernel(tmp_path: Path) -> None:
    with both(tmp_path) as mounts:
        assert same(mounts, _flags) == {"rw"}
        assert same(mounts, _null_device) == "ok"


def test_nodev_nosuid_kept_when_asked(tmp_path: Path) -> None:
    with both(tmp_path, ("nodev", "nosuid")) as mounts:
        # the kernel's overlay takes them as mount flags too
        assert same(mounts, _flags) == {"nodev", "nosuid"}
        assert same(mounts, _null_device) == "EACCES"


def _remount(mnt: Path, how: str, fuse: bool) -> None:
    if fuse:  # what mount.fuse3 runs for `mount -o remount,ro MNT`
        r = ovf("overlayfuse", str(mnt), "-o", f"{how},relatime,remount,user_id=0,group_id=0,"
                "default_permissions,allow_other")
    else:
        r = subprocess.run(["mount", "-o", f"remount,{how}", str(mnt)], capture_output=True,
                           text=True)
    assert r.returncode == 0, r.stderr


def test_remount_read_only_and_back(tmp_path: Path) -> None:
    def steps(mnt: Path, fuse: bool) -> list[Any]:
        _remount(mnt, "ro", fuse)
        got = [_flags(mnt), outcome(lambda: (mnt / "new").write_bytes(b"x")),
               (mnt / "low").read_bytes()]
        _remount(mnt, "rw", fuse)
        got += [_flags(mnt), outcome(lambda: (mnt / "new").write_bytes(b"x") and None)]
        return got

    with both(tmp_path) as mounts:
        got = {name: steps(mnt, name == "overlayfuse") for name, mnt in mounts}
        assert got["overlayfuse"] == got["kernel"]
        assert got["kernel"][1] == "EROFS"


def test_rename_over_an_open_file_keeps_it_readable(tmp_path: Path) -> None:
    def steps(mnt: Path) -> list[Any]:
        (mnt / "a").write_bytes(b"new data\n")
        (mnt / "b").write_bytes(b"old data\n")
        fd = os.open(mnt / "b", os.O_RDONLY)
        try:
            os.rename(mnt / "a", mnt / "b")
            st = os.fstat(fd)
            return [st.st_nlink, st.st_size, os.pread(fd, 100, 0), (mnt / "b").read_bytes()]
        finally:
            os.close(fd)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [0, 9, b"old data\n", b"new data\n"]


def test_removed_open_file_keeps_the_link_count_of_what_it_reads(tmp_path: Path) -> None:
    """An open lower file removed through the overlay still counts its one lower name (the
    kernel stats the lower inode); an upper copy removed while open counts none."""
    def steps(mnt: Path) -> list[int]:
        (mnt / "up").write_bytes(b"upper\n")
        fds = [os.open(mnt / name, os.O_RDONLY) for name in ("low", "up")]
        try:
            for name in ("low", "up"):
                os.unlink(mnt / name)
            return [os.fstat(fd).st_nlink for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [1, 0]


def test_removed_symlink_still_reads_through_its_o_path_fd(tmp_path: Path) -> None:
    def steps(mnt: Path) -> list[Any]:
        os.symlink("target/of/link", mnt / "ln")
        fd = os.open(mnt / "ln", os.O_PATH | os.O_NOFOLLOW)
        try:
            os.unlink(mnt / "ln")
            return [outcome(os.readlink, "", dir_fd=fd), stat_type(os.fstat(fd).st_mode)]
        finally:
            os.close(fd)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == ["target/of/link", "other"]


def test_rename_over_an_open_directory_keeps_it_statable(tmp_path: Path) -> None:
    """xfstests generic/035: with zero-message dirs the daemon never hears of the open."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "a").mkdir()
        (mnt / "b").mkdir()
        fd = os.open(mnt / "b", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(mnt / "a", mnt / "b")
            st = os.fstat(fd)
            return [st.st_nlink, stat_type(st.st_mode), outcome(os.listdir, fd)]
        finally:
            os.close(fd)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [0, "dir", []]


def test_rename_whiteout_refused_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/078: the kernel's overlay takes only NOREPLACE and EXCHANGE."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "a").write_bytes(b"a\n")
        rename = _libc.renameat2
        got = rename(-100, os.fsencode(mnt / "a"), -100, os.fsencode(mnt / "b"), 4)
        return [got, errno.errorcode.get(ctypes.get_errno()), sorted(os.listdir(mnt))]

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [-1, "EINVAL", ["a", "low"]]


def test_o_direct_write_then_buffered_read(tmp_path: Path) -> None:
    def steps(mnt: Path) -> list[bytes]:
        (mnt / "d").write_bytes(b"\0" * 8192)
        cached = os.open(mnt / "d", os.O_RDONLY)
        try:
            before = os.pread(cached, 4, 0)  # the old data now sits in the page cache
            fd = os.open(mnt / "d", os.O_RDWR | os.O_DIRECT)
            with mmap.mmap(-1, 4096) as buf:  # O_DIRECT wants an aligned buffer
                buf.write(b"Y" * 4096)
                os.pwrite(fd, buf, 0)
            os.close(fd)
            return [before, os.pread(cached, 4, 0), (mnt / "low").read_bytes()]
        finally:
            os.close(cached)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [b"\0" * 4, b"YYYY", b"lower\n"]


def test_async_o_direct_write_then_buffered_read(tmp_path: Path) -> None:
    """xfstests generic/451: the kernel's FUSE drops stale pages only after a direct write it
    sent synchronously.  With asynchronous direct I/O declined (async-dio.patch) every one is;
    on stock pyfuse3 the daemon drops them after an io_submit write."""
    def steps(mnt: Path) -> list[Any]:
        (mnt / "d").write_bytes(b"U" * 65536)
        cached = os.open(mnt / "d", os.O_RDONLY)
        fd = os.open(mnt / "d", os.O_RDWR | os.O_DIRECT)
        try:
            before = os.pread(cached, 4, 0)
            with mmap.mmap(-1, 4096) as buf:
                buf.write(b"a" * 4096)
                written = aio_pwrite(fd, buf, 0)
            return [before, written, os.pread(cached, 4, 0), os.pread(cached, 4, 4096)]
        finally:
            os.close(fd)
            os.close(cached)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [b"UUUU", 4096, b"aaaa", b"UUUU"]


def test_atime_like_the_kernel(tmp_path: Path) -> None:
    old = 946684800  # 2000-01-01: older than the mtime, so relatime updates it

    def steps(mnt: Path) -> list[bool]:
        (mnt / "up").write_bytes(b"upper\n")
        os.utime(mnt / "up", (old, time.time()))
        for name in ("low", "up"):
            (mnt / name).read_bytes()
        return [os.stat(mnt / name).st_atime > old for name in ("low", "up")]

    with both(tmp_path, lower_atime=old) as mounts:
        assert same(mounts, steps) == [False, True]


@pytest.mark.parametrize("mode,expected", [
    ("relatime", [True, False]), ("strictatime", [True, True]), ("noatime", [False, False])])
def test_atime_mount_options_like_the_kernel(tmp_path: Path, mode: str,
                                             expected: list[bool]) -> None:
    """The mount's atime option decides for upper files; a read never changes a ctime."""
    def steps(mnt: Path) -> list[Any]:
        up = mnt / "up"
        up.write_bytes(b"upper\n")
        now = time.time()
        changed = []
        # first atime older than the mtime (relatime updates it), then newer than mtime and
        # ctime (relatime leaves it)
        for atime in (now - 200, now + 100):
            os.utime(up, (atime, now - 100))
            before = os.stat(up)
            up.read_bytes()
            after = os.stat(up)
            changed.append(after.st_atime_ns != before.st_atime_ns)
            assert after.st_ctime_ns == before.st_ctime_ns
        low = os.stat(mnt / "low").st_atime_ns
        (mnt / "low").read_bytes()
        return changed + [os.stat(mnt / "low").st_atime_ns == low]

    with both(tmp_path, (mode,), lower_atime=946684800) as mounts:
        assert same(mounts, steps) == expected + [True]


_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value (version 2; entries of tag, perm, id in order)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in sorted(
        entries, key=lambda e: (e[0], e[2])))


def test_posix_acls_honoured_like_the_kernel(unprivileged) -> None:
    u = unprivileged
    base = u.home / "acl"
    sides = {}
    for name in ("kernel", "overlayfuse", "noacl"):
        layers = make_layers(base / name, 1)
        for d in (base, base / name, *layers.lowers, layers.mnt):
            os.chmod(d, 0o755)
        low = layers.lowers[0]
        (low / "granted").write_bytes(b"granted by an ACL\n")
        os.chmod(low / "granted", 0o600)  # root only, but for the ACL entry of the user
        os.setxattr(low / "granted", "system.posix_acl_access", _acl(
            (_ACL_USER_OBJ, 6, _NO_ID), (_ACL_USER, 4, u.uid), (_ACL_GROUP_OBJ, 0, _NO_ID),
            (_ACL_MASK, 4, _NO_ID), (_ACL_OTHER, 0, _NO_ID)))
        (low / "denied").write_bytes(b"everyone but the user\n")
        os.chmod(low / "denied", 0o666)
        os.setxattr(low / "denied", "system.posix_acl_access", _acl(
            (_ACL_USER_OBJ, 6, _NO_ID), (_ACL_USER, 0, u.uid), (_ACL_GROUP_OBJ, 6, _NO_ID),
            (_ACL_MASK, 6, _NO_ID), (_ACL_OTHER, 6, _NO_ID)))
        sides[name] = layers
    code = ("import sys\nfrom pathlib import Path\nm = Path(sys.argv[1])\nfor op in ("
            "lambda: (m / 'granted').read_bytes(), lambda: open(m / 'denied', 'ab').close(),"
            " lambda: (m / 'denied').read_bytes()):\n    try:\n        op()\n"
            "        print('ok')\n    except OSError as e:\n        print(e.errno)\n")
    got = {}
    k, f, n = sides["kernel"], sides["overlayfuse"], sides["noacl"]
    with kernel_overlay(k.lowers, k.upper, k.work, k.mnt), \
            overlayfuse_mount(f.lowers, f.upper, f.work, f.mnt), \
            overlayfuse_mount(n.lowers, n.upper, n.work, n.mnt, extra=("noacl",)):
        for name, layers in sides.items():
            r = u.run_as_user([u.python, "-c", code, str(layers.mnt)], capture_output=True,
                              text=True)
            got[name] = r.stdout.split()
    assert got["overlayfuse"] == got["kernel"] == ["ok", "13", "13"], got
    # fuse-overlayfs' noacl: the mode bits alone decide
    assert got["noacl"] == ["13", "ok", "ok"], got


def test_unlinked_open_file_keeps_xattrs_and_writes(tmp_path: Path) -> None:
    def steps(mnt: Path) -> list[Any]:
        (mnt / "f").write_bytes(b"data\n")
        os.setxattr(mnt / "f", "user.k", b"v")
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            os.unlink(mnt / "f")
            return [outcome(os.getxattr, fd, "user.k"), outcome(os.setxattr, fd, "user.n", b"w"),
                    sorted(os.listxattr(fd)), outcome(os.write, fd, b"more"),
                    os.pread(fd, 100, 0)]
        finally:
            os.close(fd)

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [b"v", "ok", ["user.k", "user.n"], 4, b"more\n"]


def stat_type(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "other"


_libc = ctypes.CDLL(None, use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def _name_to_handle(path: Path) -> _FileHandle:
    handle, mount_id = _FileHandle(handle_bytes=128), ctypes.c_int()
    if _libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(handle),
                               ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    return handle


def _read_by_handle(mnt_fd: int, handle: _FileHandle) -> Any:
    """What the handle opens: a file's data, a directory's listing, or the errno's name."""
    fd = _libc.open_by_handle_at(mnt_fd, ctypes.byref(handle), os.O_RDONLY)
    if fd < 0:
        return errno.errorcode[ctypes.get_errno()]
    try:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            return sorted(os.listdir(fd))
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_file_handles_survive_eviction_like_the_kernel(tmp_path: Path) -> None:
    def steps(mnt: Path) -> dict[str, Any]:
        (mnt / "d" / "sub").mkdir(parents=True)
        (mnt / "d" / "sub" / "f").write_bytes(b"deep\n")
        (mnt / "gone").write_bytes(b"deleted\n")
        (mnt / "moved").write_bytes(b"renamed\n")
        names = ["d", "d/sub", "d/sub/f", "gone", "moved", "low"]
        (mnt / "held").write_bytes(b"unlinked, open\n")
        names.append("held")
        handles = {name: _name_to_handle(mnt / name) for name in names}
        held = os.open(mnt / "held", os.O_RDONLY)
        (mnt / "held").unlink()
        (mnt / "gone").unlink()
        os.rename(mnt / "moved", mnt / "d" / "moved")
        with open(mnt / "low", "ab") as f:  # copy-up of the lower file after its handle
            f.write(b"more\n")
        Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets the inodes
        mnt_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {name: _read_by_handle(mnt_fd, handles[name]) for name in names}
        finally:
            os.close(mnt_fd)
            os.close(held)

    with both(tmp_path, kernel_extra=("nfs_export=on",)) as mounts:
        assert same(mounts, steps) == {
            "d": ["moved", "sub"], "d/sub": ["f"], "d/sub/f": b"deep\n", "gone": "ESTALE",
            "moved": b"renamed\n", "low": b"lower\nmore\n", "held": b"unlinked, open\n"}


def test_file_handles_follow_the_other_link_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/426 -l then -u: a handle to a hard-linked file opens it by its other
    name after the first one was unlinked, though the kernel forgot the inode in between
    (and then knew it again only by the name that was unlinked)."""
    def steps(mnt: Path) -> dict[str, Any]:
        files = {"f": b"upper\n", "low": None}
        (mnt / "f").write_bytes(b"upper\n")
        handles = {name: _name_to_handle(mnt / name) for name in files}
        for name in files:
            os.link(mnt / name, mnt / f"{name}.link")
        drop = Path("/proc/sys/vm/drop_caches")
        drop.write_text("2")  # forgotten with both names known
        for name in files:
            os.stat(mnt / name)  # known again, by its first name only
            os.unlink(mnt / name)
        drop.write_text("2")
        mnt_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {name: _read_by_handle(mnt_fd, handles[name]) for name in files}
        finally:
            os.close(mnt_fd)

    with both(tmp_path, kernel_extra=("nfs_export=on",)) as mounts:
        assert same(mounts, steps) == {"f": b"upper\n", "low": b"lower\n"}


def test_file_handles_survive_a_remount_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/477: handles taken before an unmount open their files after it."""
    def take(mnt: Path) -> dict[str, _FileHandle]:
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"kept\n")
        return {name: _name_to_handle(mnt / name) for name in ("d", "d/f", "low")}

    def use(mnt: Path, handles: dict[str, _FileHandle]) -> dict[str, Any]:
        mnt_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {name: _read_by_handle(mnt_fd, h) for name, h in handles.items()}
        finally:
            os.close(mnt_fd)

    results = {}
    for name in ("kernel", "overlayfuse"):
        layers = make_layers(tmp_path / name, 1)
        (layers.lowers[0] / "low").write_bytes(b"lower\n")
        for round_ in ("take", "use"):
            if name == "kernel":
                ctx = kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt,
                                     "redirect_dir=on,index=on,nfs_export=on")
            else:
                ctx = overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt)
            with ctx:
                if round_ == "take":
                    handles = take(layers.mnt)
                else:
                    results[name] = use(layers.mnt, handles)
    assert results["overlayfuse"] == results["kernel"] == {
        "d": ["f"], "d/f": b"kept\n", "low": b"lower\n"}, results


def _as_user(fn: Callable[[], Any], gid: int = 54321) -> int:
    """Run ``fn`` in a child as uid 12345 with only group ``gid``: not root, and by default
    outside the group of every file the tests make."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(12345)
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return os.waitpid(pid, 0)[1]


def test_setting_an_acl_clears_sgid_outside_the_group_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/375: the owner sets an access ACL; setgid stays only for a member of
    the file's group."""
    acl = _acl((_ACL_USER_OBJ, 7, _NO_ID), (_ACL_GROUP_OBJ, 7, _NO_ID), (_ACL_OTHER, 7, _NO_ID))

    def steps(mnt: Path) -> list[Any]:
        out = []
        for name, gid in (("member", 12345), ("outsider", 54321)):
            (mnt / name).write_bytes(b"x\n")
            os.chown(mnt / name, 12345, 12345)
            os.chmod(mnt / name, 0o2755)
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                set_acl = functools.partial(os.setxattr, fd, "system.posix_acl_access", acl)
                out += [_as_user(set_acl, gid), oct(stat.S_IMODE(os.stat(mnt / name).st_mode))]
            finally:
                os.close(fd)
        return out

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [0, "0o2777", 0, "0o777"]


def test_create_keeps_the_setgid_bit_asked_for_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/633: root creates a group-executable setgid file in a setgid dir."""
    def steps(mnt: Path) -> str:
        (mnt / "sg").mkdir()
        os.chmod(mnt / "sg", 0o2777)
        os.close(os.open(mnt / "sg" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2010))
        return oct(stat.S_IMODE(os.stat(mnt / "sg" / "f").st_mode))

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == "0o2010"


def _new_entry_modes(mnt: Path, where: str) -> list[str]:
    """Modes of a file, a dir and a fifo made under umask 022 in ``where`` (made here)."""
    base = mnt / where
    base.mkdir()
    if where == "acl":  # a default ACL replaces the umask (POSIX.1e), as on a local fs
        os.setxattr(base, "system.posix_acl_default", _acl(
            (_ACL_USER_OBJ, 7, _NO_ID), (_ACL_GROUP_OBJ, 7, _NO_ID), (_ACL_OTHER, 7, _NO_ID)))
    old = os.umask(0o022)
    try:
        os.close(os.open(base / "file", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(base / "dir", 0o777)
        os.mkfifo(base / "fifo", 0o666)
    finally:
        os.umask(old)
    return [oct(stat.S_IMODE(os.lstat(base / n).st_mode)) for n in ("file", "dir", "fifo")]


def test_umask_applies_to_new_entries_like_the_kernel(tmp_path: Path) -> None:
    with both(tmp_path) as mounts:
        assert same(mounts, lambda m: _new_entry_modes(m, "plain")) == ["0o644", "0o755",
                                                                       "0o644"]


@pytest.mark.skipif(not hasattr(pyfuse3.Operations, "enable_dont_mask"),
                    reason="stock pyfuse3: the kernel applies the umask before the daemon "
                           "sees the mode (FUSE_CAP_DONT_MASK: tools/pyfuse3/dont-mask.patch)")
def test_default_acl_replaces_the_umask_like_the_kernel(tmp_path: Path) -> None:
    """xfstests generic/099, 319, 444: under a default ACL the umask does not apply."""
    with both(tmp_path) as mounts:
        assert same(mounts, lambda m: _new_entry_modes(m, "acl")) == ["0o666", "0o777", "0o666"]


_CAPS = "security.capability"
# a v2 file capability: cap_net_raw permitted and effective (what `setcap cap_net_raw+ep` sets)
_CAP_NET_RAW = struct.pack("<IIIII", 0x02000000 | 1, 1 << 13, 0, 0, 0)


def _caps_around_writes(mnt: Path) -> list[Any]:
    """The kernel asks for security.capability before every write (the daemon keeps a "none"
    answer): one set between two writes must still be seen, and killed by the next write."""
    seen = []
    for name in ("new", "low"):
        path = mnt / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o755)
        try:
            os.write(fd, b"a")
            seen.append(outcome(os.getxattr, path, _CAPS))
            os.setxattr(path, _CAPS, _CAP_NET_RAW)
            seen.append(outcome(os.getxattr, path, _CAPS))
            os.write(fd, b"b")
            seen.append(outcome(os.getxattr, path, _CAPS))
            os.setxattr(path, _CAPS, _CAP_NET_RAW)
        finally:
            os.close(fd)
        seen.append(outcome(os.getxattr, path, _CAPS))
        seen.append(path.read_bytes())
    return seen


def test_file_capabilities_set_between_writes_like_the_kernel(tmp_path: Path) -> None:
    with both(tmp_path) as mounts:
        seen = same(mounts, _caps_around_writes)
    assert seen[:4] == ["ENODATA", _CAP_NET_RAW, "ENODATA", _CAP_NET_RAW], seen


def _with_fd(path: str, flags: int, fn: Callable[[int], Any]) -> None:
    fd = os.open(path, flags)
    try:
        fn(fd)
    finally:
        os.close(fd)


# each given "/proc/self/fd/DIRFD/NAME": a child reaches the file without searching the
# test's private tmp dirs
_CHANGES: dict[str, Callable[[str], Any]] = {
    "write": lambda p: _with_fd(p, os.O_WRONLY | os.O_APPEND, lambda fd: os.write(fd, b"y\n")),
    "fallocate": lambda p: _with_fd(p, os.O_WRONLY, lambda fd: os.posix_fallocate(fd, 0, 8192)),
    "ftruncate": lambda p: _with_fd(p, os.O_WRONLY, lambda fd: os.ftruncate(fd, 1)),
    "truncate": lambda p: os.truncate(p, 1),
    "open O_TRUNC": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
}
_SETID_MODES = (0o6666, 0o6766, 0o6676, 0o6777, 0o2666, 0o2676, 0o4666)


@pytest.mark.parametrize("op", sorted(_CHANGES))
def test_a_change_clears_setuid_and_setgid_like_the_kernel(tmp_path: Path, op: str) -> None:
    """xfstests generic/683-685: a user outside the group of a root-owned setuid/setgid file
    who changes it clears setuid, and setgid also where the group may not execute the file
    (the kernel's FUSE client clears that one only with group-exec: the daemon completes
    it); root, holding CAP_FSETID, clears neither."""
    def steps(mnt: Path) -> list[Any]:
        out = []
        dirfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
        try:
            for i, mode in enumerate(_SETID_MODES * 2):
                name = f"f{i}"
                (mnt / name).write_bytes(b"x\n" * 100)
                os.chmod(mnt / name, mode)
                change = functools.partial(_CHANGES[op], f"/proc/self/fd/{dirfd}/{name}")
                if i < len(_SETID_MODES):
                    out.append(_as_user(change))
                else:
                    change()
                out.append(oct(stat.S_IMODE(os.stat(mnt / name).st_mode)))
        finally:
            os.close(dirfd)
        return out

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [
            x for m in ("666", "766", "676", "777", "666", "676", "666") for x in (0, "0o" + m)
        ] + [oct(m) for m in _SETID_MODES]


def test_chmod_setgid_outside_the_group_drops_it_like_the_kernel(tmp_path: Path) -> None:
    """The owner who is not in the file's group cannot set setgid: chmod silently drops it
    (the kernel's FUSE client drops it before it asks; the daemon, which chmods with its own
    credentials, must not put it back), a member keeps it."""
    def steps(mnt: Path) -> list[Any]:
        out = []
        dirfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
        try:
            for name, gid in (("member", 777), ("outsider", 54321)):
                for kind in ("file", "dir"):
                    path = mnt / f"{name}-{kind}"
                    if kind == "dir":
                        path.mkdir()
                    else:
                        path.write_bytes(b"x\n")
                    os.chown(path, 12345, 777)
                    out += [_as_user(functools.partial(
                        os.chmod, f"/proc/self/fd/{dirfd}/{path.name}", 0o2755), gid),
                        oct(stat.S_IMODE(os.stat(path).st_mode))]
        finally:
            os.close(dirfd)
        return out

    with both(tmp_path) as mounts:
        assert same(mounts, steps) == [0, "0o2755", 0, "0o2755", 0, "0o755", 0, "0o755"]
