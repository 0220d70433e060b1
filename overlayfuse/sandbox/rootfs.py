"""A directory made into the root of a mount namespace: the standard mounts, binds, pivot_root.

Everything is mounted under the tree first and then pivot_root'ed into, so the host's paths are
read while they are still there.  Paths in the tree are resolved as the command will see them
(``resolve_in``: symlinks taken relative to the tree), never through the host's ``/``.  The tree
is only ever written for mount points it lacks (``/proc``, ``/dev``, ``/sys`` and ``--bind``
targets, made empty); the host's resolv.conf and hosts are shown as throwaway copies (a tree
without those files gets none), so a write to them reaches neither the host nor the tree.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass

from ..errors import OverlayfuseError
from ..sysmount import mounts_under
from ..sysmount.syscalls import (MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY,
                                 MS_REC, MS_REMOUNT, make_readonly_recursive, mount, pivot_root,
                                 umount2)

log = logging.getLogger(__name__)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")


@dataclass(frozen=True)
class Bind:
    """A host path ``source`` shown at ``target`` in the tree, read-only if asked."""

    source: str
    target: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> "Bind":
        """``SRC[:DST[:ro|rw]]`` (DST defaults to SRC), the form of ``--bind``."""
        parts = text.split(":")
        if not parts[0] or len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise OverlayfuseError(f"--bind {text}: expected SRC[:DST[:ro]]")
        target = parts[1] if len(parts) > 1 and parts[1] else parts[0]
        return cls(os.path.abspath(parts[0]), target, len(parts) == 3 and parts[2] == "ro")

    def check(self) -> None:
        """OverlayfuseError unless the source exists and the target is a path in the tree."""
        if not os.path.exists(self.source):
            raise OverlayfuseError(f"--bind {self.source}: no such file or directory")
        check_tree_path(self.target, f"--bind target {self.target}")


def check_tree_path(path: str, what: str) -> None:
    """A path inside the tree is absolute and never climbs (``..``): else it would name a
    place outside it, or depend on where the tree is."""
    if not path.startswith("/") or ".." in path.split("/"):
        raise OverlayfuseError(f"{what} is outside the tree: give an absolute path "
                               "without '..'")


def resolve_in(root: str, path: str) -> str:
    """The host path of ``path`` as seen with ``root`` as ``/``: symlinks are followed inside
    the tree (an absolute one restarts at ``root``, ``..`` stops at it); missing components are
    kept as they are."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        if not os.path.islink(here):
            done.append(name)
            continue
        links += 1
        if links > 40:
            raise OverlayfuseError(f"{path} in the tree: too many levels of symbolic links")
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return os.path.join(root, *done)


def make_readonly(path: str) -> None:
    """The mount at ``path`` and the ones below it read-only (their other flags kept)."""
    try:
        make_readonly_recursive(path)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        remount_readonly(path)


def remount_readonly(path: str) -> None:
    """make_readonly for kernels before 5.12: each mount remounted with the flags it had (a
    user namespace refuses to drop the ones it locked); MS_* and ST_* bits agree for these."""
    keep = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME
    for mnt in reversed(mounts_under(path)):
        flags = os.statvfs(mnt).f_flag
        atime = (1 << 21) if flags & os.ST_RELATIME else 0  # MS_RELATIME
        mount(None, mnt, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & keep) | atime)


def _mount_point(root: str, path: str, like: str = "dir") -> str:
    """``path`` in the tree, made (empty) if it is missing: a directory or a file."""
    host = resolve_in(root, path)
    if not os.path.lexists(host):
        os.makedirs(os.path.dirname(host), exist_ok=True)
        if like == "dir":
            os.mkdir(host, 0o755)
        else:
            os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    return host


def _make_dev(root: str, pts_gid: int | None) -> None:
    """/dev as a small tmpfs: the host's harmless nodes bound in, a private devpts, shm."""
    dev = _mount_point(root, "/dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
    for name in DEV_NODES:
        host = f"/dev/{name}"
        if not os.path.exists(host):
            log.debug("no %s on the host: the sandbox goes without it", host)
            continue
        os.close(os.open(os.path.join(dev, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        mount(host, os.path.join(dev, name), None, MS_BIND)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    gid = f",gid={pts_gid}" if pts_gid is not None else ""
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          f"newinstance,ptmxmode=0666,mode=0620{gid}")
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def _make_sys(root: str) -> None:
    """A read-only sysfs of our own where the kernel allows it (root, or a user namespace that
    owns the network namespace), else the host's /sys bound in, read-only throughout."""
    target = _mount_point(root, "/sys")
    try:
        mount("sysfs", target, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
    mount("/sys", target, None, MS_BIND | MS_REC)
    make_readonly(target)


def _show_host_file(root: str, path: str) -> None:
    """The host's ``path`` as a throwaway copy over the tree's (kept in the /dev tmpfs only
    while it is bound: unlinked, it shows nowhere else)."""
    target = resolve_in(root, path)
    if not os.path.isfile(path) or not os.path.isfile(target):
        log.debug("%s: not on the host or not a file in the tree: not shown", path)
        return
    copy = os.path.join(resolve_in(root, "/dev"), f".{os.path.basename(path)}")
    shutil.copyfile(path, copy)
    os.chmod(copy, 0o644)
    try:
        mount(copy, target, None, MS_BIND)
    finally:
        os.unlink(copy)


def _bind(root: str, bind: Bind) -> None:
    target = _mount_point(root, bind.target, "dir" if os.path.isdir(bind.source) else "file")
    mount(bind.source, target, None, MS_BIND | MS_REC)
    if bind.readonly:
        make_readonly(target)


def build_root(root: str, binds: tuple[Bind, ...], pts_gid: int | None) -> None:
    """Mount /proc, /dev, /sys, the host files and ``binds`` under ``root``, then make it ``/``
    (pivot_root; the old root detached).  Runs as the new PID namespace's init, in a private
    mount namespace."""
    mount(root, root, None, MS_BIND | MS_REC)  # pivot_root wants a mount point
    mount("proc", _mount_point(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _make_dev(root, pts_gid)
    _make_sys(root)
    for path in HOST_FILES:
        _show_host_file(root, path)
    for bind in binds:
        _bind(root, bind)
    os.chdir(root)
    pivot_root(".", ".")  # the old root now sits on top of the new one: detach it
    umount2(".", MNT_DETACH)
    os.chdir("/")
