"""Namespace changes (dir.c): create, mkdir, mknod, symlink, link, unlink, rmdir, rename.

Every change lands in the upper layer.  A name that still exists in a lower layer is hidden by
a whiteout; a new directory over a whiteout is opaque; a renamed directory with lower parts
carries a ``redirect`` to them (the kernel's ``redirect_dir=on``), so renames never fail with
EXDEV.  Entries that replace a whiteout are built in ``work/`` and swapped in atomically.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat

import pyfuse3

from .. import format as fmt
from . import index, override
from .copy_up import (copy_up, copy_up_name, copy_up_to_index, ensure_upper_dir, mark_impure,
                      temp_name)
from .inodes import Node
from .layers import join
from .namei import _lstat, _oci_whiteout, check_name, resolve
from .overlay import Overlay
from .readdir import is_empty

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int = 0) -> None:
    if _libc.renameat2(src_dir, src, dst_dir, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Caller:
    """Who asked: as root the new entry gets the caller's uid/gid (setgid dirs keep theirs),
    as on-disk IDs: the request's IDs go back through ``uidmapping=``/``gidmapping=``.
    ``umask`` is the caller's, for the modes of new entries (``masked``)."""

    def __init__(self, uid: int, gid: int, umask: int = 0) -> None:
        self.uid, self.gid, self.umask = uid, gid, umask

    def masked(self, udir: int, mode: int) -> int:
        """The mode for a new entry in the upper dir ``udir``: the caller's umask applies
        unless the dir has a default ACL, which replaces it (the backing filesystem applies
        that one).  Where the kernel already applied the umask (no FUSE_CAP_DONT_MASK, or no
        ACLs), applying it again changes nothing."""
        if not self.umask or not mode & self.umask:
            return mode
        try:
            os.getxattr(fmt.proc_path(udir, b""), "system.posix_acl_default")
            return mode
        except OSError:  # ENODATA: none; ENOTSUP: no ACLs there
            return mode & ~self.umask

    @classmethod
    def of_request(cls, ovl: Overlay, uid: int, gid: int, umask: int = 0) -> "Caller":
        """The caller of a request.  One whose ID no range maps (the host's root preparing a
        container's tree: podman makes /etc/mtab so) creates entries owned by the overflow
        ID on disk, as fuse-overlayfs does: refusing would break the container engines."""
        if not ovl.config.as_root and not ovl.overrides.active:
            return cls(uid, gid, umask)  # new entries belong to the daemon's user anyway
        owners = ovl.config.owners
        disk_uid, disk_gid = owners.disk_uid(uid), owners.disk_gid(gid)
        return cls(owners.overflow_uid if disk_uid is None else disk_uid,
                   owners.overflow_gid if disk_gid is None else disk_gid, umask)


def _own(ovl: Overlay, dirfd: int, name: bytes, parent_fd: int, caller: Caller) -> None:
    if ovl.overrides.active and _own_override(ovl, dirfd, name, parent_fd, caller):
        return
    if not ovl.config.as_root:
        return
    gid = caller.gid
    if os.fstat(parent_fd).st_mode & stat.S_ISGID:
        gid = -1  # the backing filesystem already gave it the directory's group
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    os.chown(name, caller.uid, gid, dir_fd=dirfd, follow_symlinks=False)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
        # chown clears setuid/setgid (setgid only with group-exec) even for root, but the
        # mode the kernel sent is final (it already dropped what the caller may not set):
        # xfstests generic/633
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dirfd)


def _own_override(ovl: Overlay, dirfd: int, name: bytes, parent_fd: int, caller: Caller) -> bool:
    """With ``xattr_permissions``, a new file or directory stays the daemon's on disk, mode
    ``| 0755``; its owner and mode go in the override xattr (override.py).  False for what
    carries no override (symlinks, devices, fifos): those are owned as without the option."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not override.applies(st.st_mode):
        return False
    gid, mode = caller.gid, stat.S_IMODE(st.st_mode)
    parent = ovl.overrides.read(0, fmt.proc_path(parent_fd, b""), True)
    if parent is not None and parent[2] & stat.S_ISGID:
        gid = parent[1]  # a setgid directory's group, as the kernel gives it
        if stat.S_ISDIR(st.st_mode):
            mode |= stat.S_ISGID
    path = fmt.proc_path(dirfd, name)
    ovl.overrides.write(path, False, caller.uid, gid, mode)
    os.chmod(name, override.Overrides.backing_mode(mode), dir_fd=dirfd)
    return True


def backing_mode(ovl: Overlay, mode: int) -> int:
    """The mode a new entry gets on disk."""
    return override.Overrides.backing_mode(mode) if ovl.overrides.active else stat.S_IMODE(mode)


def lower_positive(ovl: Overlay, parent: Node, name: bytes) -> bool:
    """Does ``name`` exist in a lower layer of ``parent``?  Then removing it needs a whiteout."""
    if parent.opaque:
        return False
    for layer, path in parent.lower:
        try:
            dfd = ovl.dirfds.get(layer, path)
        except OSError:
            continue
        st = _lstat(dfd, name)
        if st is None:
            if _oci_whiteout(dfd, name):
                return False
            continue
        return not (fmt.is_whiteout_stat(st) or fmt.is_xattr_whiteout(dfd, name, st, ovl.prefix))
    return False


def _upper_is_whiteout(ovl: Overlay, udir: int, name: bytes) -> bool:
    st = _lstat(udir, name)
    return st is not None and (fmt.is_whiteout_stat(st)
                               or fmt.is_xattr_whiteout(udir, name, st, ovl.prefix))


def _prepare_new(ovl: Overlay, parent: Node, name: bytes) -> tuple[int, bool]:
    """Copy the parent up; say whether the new entry must be built in work/ (a whiteout sits
    at its name) or can be made in place."""
    check_name(name)
    if name.startswith(fmt.WH_PREFIX):
        raise pyfuse3.FUSEError(errno.EPERM)  # would read back as an OCI whiteout marker
    ovl.require_writable()
    ovl.changed(parent, listing=True)
    udir = ensure_upper_dir(ovl, parent)
    return udir, _upper_is_whiteout(ovl, udir, name)


def _install(ovl: Overlay, udir: int, name: bytes, tmp: bytes, is_dir: bool) -> None:
    """Move a finished entry from work/ over the whiteout at ``name`` in one step."""
    if is_dir:
        renameat2(ovl.work_fd, tmp, udir, name, RENAME_EXCHANGE)
        os.unlink(tmp, dir_fd=ovl.work_fd)  # the whiteout, now in work/
    else:
        os.rename(tmp, name, src_dir_fd=ovl.work_fd, dst_dir_fd=udir)


def _finish_new(ovl: Overlay, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
    found = resolve(ovl, parent, name)
    if found is None:
        raise pyfuse3.FUSEError(errno.EIO)
    fresh, st = found
    node = ovl.table.bind(parent, name, fresh)
    node.lookups += 1
    return node, st


def create(ovl: Overlay, parent: Node, name: bytes, mode: int, flags: int,
           caller: Caller) -> tuple[Node, os.stat_result, int]:
    oflags = (flags & ~(os.O_TRUNC | getattr(os, "O_DIRECT", 0))) | os.O_CREAT | os.O_EXCL \
        | os.O_NOFOLLOW | os.O_CLOEXEC
    opened: list[int] = []

    def make(entry: bytes, where: int, udir: int) -> None:
        opened.append(os.open(entry, oflags, caller.masked(udir, stat.S_IMODE(mode)),
                              dir_fd=where))

    try:
        node, st = _make_node_at(ovl, parent, name, make, caller)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return node, st, opened[0]


def mkdir(ovl: Overlay, parent: Node, name: bytes, mode: int, caller: Caller) -> tuple[Node, os.stat_result]:
    udir, over_whiteout = _prepare_new(ovl, parent, name)
    mode = caller.masked(udir, stat.S_IMODE(mode))
    if not over_whiteout:
        os.mkdir(name, mode, dir_fd=udir)
        _own(ovl, udir, name, udir, caller)
        return _finish_new(ovl, parent, name)
    tmp = temp_name()
    os.mkdir(tmp, mode, dir_fd=ovl.work_fd)
    try:
        _own(ovl, ovl.work_fd, tmp, udir, caller)
        # the lower dir of that name must not show through the new one
        fmt.set_overlay_xattr(ovl.work_fd, tmp, ovl.prefix, b"opaque", b"y")
        os.chmod(tmp, backing_mode(ovl, mode), dir_fd=ovl.work_fd)
        _install(ovl, udir, name, tmp, True)
    except BaseException:
        _rmtree_at(ovl.work_fd, tmp)
        raise
    return _finish_new(ovl, parent, name)


def _make_node_at(ovl: Overlay, parent: Node, name: bytes, make, caller: Caller) -> tuple[Node, os.stat_result]:
    udir, over_whiteout = _prepare_new(ovl, parent, name)
    where, entry = (ovl.work_fd, temp_name()) if over_whiteout else (udir, name)
    make(entry, where, udir)
    try:
        _own(ovl, where, entry, udir, caller)
        if over_whiteout:
            _install(ovl, udir, name, entry, False)
    except BaseException:
        os.unlink(entry, dir_fd=where)
        raise
    return _finish_new(ovl, parent, name)


def mknod(ovl: Overlay, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller) -> tuple[Node, os.stat_result]:
    if stat.S_ISCHR(mode) and rdev == 0:
        raise pyfuse3.FUSEError(errno.EPERM)  # a whiteout is never a user's file (as the kernel)

    def make(entry: bytes, where: int, udir: int) -> None:
        os.mknod(entry, caller.masked(udir, mode), rdev, dir_fd=where)

    return _make_node_at(ovl, parent, name, make, caller)


def symlink(ovl: Overlay, parent: Node, name: bytes, target: bytes, caller: Caller) -> tuple[Node, os.stat_result]:
    return _make_node_at(ovl, parent, name,
                         lambda entry, where, _udir: os.symlink(target, entry, dir_fd=where),
                         caller)


def link(ovl: Overlay, node: Node, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
    if node.is_dir:
        raise pyfuse3.FUSEError(errno.EPERM)
    udir, over_whiteout = _prepare_new(ovl, parent, name)
    ovl.changed(node)
    copy_up(ovl, node)
    src_dir, src_name = ovl.location(node)
    with index.Counting(ovl, node, +1):
        if over_whiteout:
            tmp = temp_name()
            os.link(src_name, tmp, src_dir_fd=src_dir, dst_dir_fd=ovl.work_fd,
                    follow_symlinks=False)
            _install(ovl, udir, name, tmp, False)
        else:
            os.link(src_name, name, src_dir_fd=src_dir, dst_dir_fd=udir, follow_symlinks=False)
    mark_impure(ovl, udir)  # the new name carries the copy's origin
    return _finish_new(ovl, parent, name)


def _existing(ovl: Overlay, parent: Node, name: bytes) -> Node:
    """The node the kernel holds for ``name`` (refreshed), or a fresh one reachable by name."""
    found = resolve(ovl, parent, name)
    if found is None:
        raise pyfuse3.FUSEError(errno.ENOENT)
    fresh = found[0]
    known = ovl.table.child(parent, name)
    if known is not None and known.ino == fresh.ino:
        known.upper, known.lower, known.opaque, known.index, known.st = (
            fresh.upper, fresh.lower, fresh.opaque, fresh.index, fresh.st)
        return known
    fresh.add_alias(parent, name)
    return fresh


def _backing_links(ovl: Overlay, node: Node) -> int:
    """The link count of the entry that holds the node now: whether other names share it (the
    cached attributes may have been dropped by an earlier change to any of its names)."""
    if node.st is not None:
        return node.st.st_nlink
    try:
        return ovl.lstat(node).st_nlink
    except (OSError, pyfuse3.FUSEError):
        return 1


def _remove_entry(ovl: Overlay, parent: Node, name: bytes, node: Node) -> None:
    """Take ``name`` out of the merged tree: delete the upper entry and/or leave a whiteout."""
    links = _backing_links(ovl, node)
    ovl.changed(parent, listing=True)
    ovl.changed(node, listing=True)
    udir = ensure_upper_dir(ovl, parent)
    need_whiteout = lower_positive(ovl, parent, name)
    in_upper = _lstat(udir, name) is not None  # this name, not the inode: hard links differ
    ovl.keep_reachable(node)  # the kernel may still have it open, and no fd of its own here
    if not in_upper and node.kind == stat.S_IFREG and links > 1:
        copy_up_to_index(ovl, node)
    with index.Counting(ovl, node, -1):
        if in_upper:
            if node.is_dir:
                ovl.dirfds.forget_tree(0, join(parent.upath(), name))
            tmp = temp_name()
            if need_whiteout:
                if fmt.make_whiteout(ovl.work_fd, tmp, ovl.prefix, ovl.record.xwhiteout):
                    fmt.mark_xattr_whiteouts(udir, ovl.prefix)
                renameat2(ovl.work_fd, tmp, udir, name, RENAME_EXCHANGE)
            else:
                os.rename(name, tmp, src_dir_fd=udir, dst_dir_fd=ovl.work_fd)
            _rmtree_at(ovl.work_fd, tmp)
        elif need_whiteout:
            if fmt.make_whiteout(udir, name, ovl.prefix, ovl.record.xwhiteout):
                fmt.mark_xattr_whiteouts(udir, ovl.prefix)
    ovl.table.unbind(parent, name)  # an open file left without a name: attrs.getattr_node


def unlink(ovl: Overlay, parent: Node, name: bytes) -> None:
    ovl.require_writable()
    node = _existing(ovl, parent, name)
    if node.is_dir:
        raise pyfuse3.FUSEError(errno.EISDIR)
    _remove_entry(ovl, parent, name, node)


def rmdir(ovl: Overlay, parent: Node, name: bytes) -> None:
    ovl.require_writable()
    node = _existing(ovl, parent, name)
    if not node.is_dir:
        raise pyfuse3.FUSEError(errno.ENOTDIR)
    if not is_empty(ovl, node):
        raise pyfuse3.FUSEError(errno.ENOTEMPTY)
    _remove_entry(ovl, parent, name, node)


def _rmtree_at(dirfd: int, name: bytes) -> None:
    """Remove a tree we moved into work/ (whiteouts and markers only), never following links."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for child in os.listdir(fd):
            _rmtree_at(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def _clear_whiteouts(ovl: Overlay, node: Node) -> None:
    """Empty an upper dir that is empty in the merged view (it holds only whiteouts), so it can
    be replaced by rename; it keeps hiding the lower entries because it becomes opaque."""
    fd = ovl.upper_dirfd(node)
    for child in os.listdir(b"/proc/self/fd/%d" % fd):
        _rmtree_at(fd, child)


def _prepare_moved_dir(ovl: Overlay, node: Node, udir: int, name: bytes, new_parent: Node,
                       new_name: bytes) -> None:
    """A moved directory keeps its lower parts via a redirect; a pure upper one moved onto a
    name that exists below must not merge with that: it becomes opaque.  Marked at ``udir``/
    ``name``, where it is before the rename (as the kernel does), so that a daemon killed
    between the two leaves a directory that shows the same entries at either name."""
    if node.lower and not node.opaque:
        ovl.record.note(fmt.REDIRECT)
        fmt.set_overlay_xattr(udir, name, ovl.prefix, b"redirect", b"/" + node.lower[0][1])
    elif not node.opaque and lower_positive(ovl, new_parent, new_name):
        fmt.set_overlay_xattr(udir, name, ovl.prefix, b"opaque", b"y")
        node.opaque = True


def rename(ovl: Overlay, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
           flags: int) -> None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise pyfuse3.FUSEError(errno.EINVAL)  # as the kernel's ovl_rename: no RENAME_WHITEOUT
    ovl.require_writable()
    check_name(new_name)
    if new_name.startswith(fmt.WH_PREFIX):
        raise pyfuse3.FUSEError(errno.EPERM)  # would read back as an OCI whiteout marker
    src = _existing(ovl, old_parent, old_name)
    try:
        dst = _existing(ovl, new_parent, new_name)
    except pyfuse3.FUSEError:
        dst = None
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _exchange(ovl, old_parent, old_name, src, new_parent, new_name, dst)
    if dst is not None:
        if flags & RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if dst.ino == src.ino:
            return  # the same name, or two names of one file: rename(2) does nothing
        if src.is_dir and not dst.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if dst.is_dir and not src.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if dst.is_dir and not is_empty(ovl, dst):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
    if src.is_dir and _is_ancestor(src, new_parent):
        raise pyfuse3.FUSEError(errno.EINVAL)
    dst_links = _backing_links(ovl, dst) if dst is not None else 0
    ovl.changed(old_parent, new_parent, src, listing=True)
    if dst is not None:
        ovl.changed(dst, listing=True)
    old_udir = ensure_upper_dir(ovl, old_parent)
    new_udir = ensure_upper_dir(ovl, new_parent)
    copy_up_name(ovl, old_parent, old_name, src)
    if src.is_dir:
        ovl.dirfds.forget_tree(0, join(old_parent.upath(), old_name))
        _prepare_moved_dir(ovl, src, old_udir, old_name, new_parent, new_name)
    src_needs_whiteout = lower_positive(ovl, old_parent, old_name)
    upper_dst = _lstat(new_udir, new_name)
    if dst is not None and dst.is_dir and dst.upper:
        _clear_whiteouts(ovl, dst)
        ovl.dirfds.forget_tree(0, join(new_parent.upath(), new_name))
    if dst is not None and upper_dst is None and dst.kind == stat.S_IFREG and dst_links > 1:
        copy_up_to_index(ovl, dst)  # its other names must keep a true link count
    if dst is not None:
        ovl.keep_reachable(dst)  # replaced, maybe still open (see _remove_entry)
    with index.Counting(ovl, dst, -1) if dst is not None else contextlib.nullcontext():
        if upper_dst is not None and src.is_dir and not stat.S_ISDIR(upper_dst.st_mode):
            # a directory cannot replace the whiteout: swap them, then keep or drop the whiteout
            renameat2(old_udir, old_name, new_udir, new_name, RENAME_EXCHANGE)
            if not src_needs_whiteout:
                os.unlink(old_name, dir_fd=old_udir)
        else:
            _rename_leaving(ovl, old_udir, old_name, new_udir, new_name, src_needs_whiteout)
    mark_impure(ovl, new_udir)  # it may now hold an entry with an origin or a redirect
    ovl.table.unbind(new_parent, new_name)
    ovl.table.unbind(old_parent, old_name)
    _rebind(ovl, new_parent, new_name, src)


def _rename_leaving(ovl: Overlay, old_udir: int, old_name: bytes, new_udir: int,
                    new_name: bytes, whiteout: bool) -> None:
    if not whiteout:
        os.rename(old_name, new_name, src_dir_fd=old_udir, dst_dir_fd=new_udir)
        return
    try:
        renameat2(old_udir, old_name, new_udir, new_name, RENAME_WHITEOUT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
            raise
        os.rename(old_name, new_name, src_dir_fd=old_udir, dst_dir_fd=new_udir)
        if fmt.make_whiteout(old_udir, old_name, ovl.prefix, ovl.record.xwhiteout):
            fmt.mark_xattr_whiteouts(old_udir, ovl.prefix)


def _exchange(ovl: Overlay, old_parent: Node, old_name: bytes, src: Node,
              new_parent: Node, new_name: bytes, dst: Node) -> None:
    if src.is_dir and _is_ancestor(src, new_parent) or dst.is_dir and _is_ancestor(dst, old_parent):
        raise pyfuse3.FUSEError(errno.EINVAL)
    ovl.changed(old_parent, new_parent, src, dst, listing=True)
    old_udir = ensure_upper_dir(ovl, old_parent)
    new_udir = ensure_upper_dir(ovl, new_parent)
    copy_up_name(ovl, old_parent, old_name, src)
    copy_up_name(ovl, new_parent, new_name, dst)
    for parent, name, udir, node, to_parent, to_name in (
            (old_parent, old_name, old_udir, src, new_parent, new_name),
            (new_parent, new_name, new_udir, dst, old_parent, old_name)):
        if node.is_dir:
            ovl.dirfds.forget_tree(0, join(parent.upath(), name))
            _prepare_moved_dir(ovl, node, udir, name, to_parent, to_name)
    renameat2(old_udir, old_name, new_udir, new_name, RENAME_EXCHANGE)
    mark_impure(ovl, old_udir)
    mark_impure(ovl, new_udir)
    ovl.table.unbind(old_parent, old_name)
    ovl.table.unbind(new_parent, new_name)
    for parent, name, node in ((new_parent, new_name, src), (old_parent, old_name, dst)):
        _rebind(ovl, parent, name, node)


def _rebind(ovl: Overlay, parent: Node, name: bytes, node: Node) -> None:
    """Give a moved node its new name; one the kernel never looked up is not recorded."""
    node.drop_alias(parent, name)
    if ovl.table.find(node.ino) is node:
        ovl.table.bind(parent, name, node)
    else:
        node.set_alias(parent, name)


def _is_ancestor(node: Node, other: Node) -> bool:
    """Is ``node`` ``other`` or one of its ancestors (moving a dir into itself is EINVAL)?"""
    while True:
        if other is node:
            return True
        if other.parent is None:
            return False
        other = other.parent
