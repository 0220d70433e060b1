"""Attributes as the kernel's overlayfs reports them (inode.c): getattr and setattr."""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from .. import format as fmt
from . import index, override
from .copy_up import copy_up
from .inodes import ROOT, Node
from .overlay import Overlay


def entry_attributes(ovl: Overlay, node: Node, st: os.stat_result,
                     fd: int = -1) -> pyfuse3.EntryAttributes:
    """Real attributes of the defining entry, with the overlay's inode number and link count
    (and the owner and mode of an override xattr, ``fd`` for an entry without a name)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = node.ino
    attr.generation = ovl.table.generation(node)
    attr.entry_timeout = ovl.config.entry_timeout
    attr.attr_timeout = ovl.config.attr_timeout
    attr.st_mode = st.st_mode
    uid, gid = st.st_uid, st.st_gid
    if ovl.overrides.active and override.applies(st.st_mode):
        found = stored_override(ovl, node, fd)
        if found is not None:
            uid, gid, mode = found
            attr.st_mode = stat.S_IFMT(st.st_mode) | mode
    if node.merged or (ovl.config.static_nlink and node.is_dir):
        attr.st_nlink = 1  # as the kernel: counting subdirs of every layer isn't worth it
    elif node.nlink_override is not None:
        attr.st_nlink = node.nlink_override
    elif node.index is not None:
        attr.st_nlink = index.nlink(ovl, node) or st.st_nlink
    else:
        attr.st_nlink = st.st_nlink
    owners = ovl.config.owners
    if owners.identity:
        attr.st_uid, attr.st_gid = uid, gid
    else:
        attr.st_uid, attr.st_gid = owners.shown(uid, gid)
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


def stored_override(ovl: Overlay, node: Node, fd: int = -1) -> tuple[int, int, int] | None:
    """(uid, gid, mode) kept in the override xattr of the entry defining ``node``."""
    if fd >= 0:
        return ovl.overrides.read_any(fd)
    try:
        dirfd, name = ovl.location(node)
        layer = 0 if node.upper or node.index is not None else node.lower[0][0]
    except (OSError, pyfuse3.FUSEError, IndexError):
        return None  # a listed entry without a node of its own: its real attributes
    return ovl.overrides.read(layer, fmt.proc_path(dirfd, name), not name)


def negative_entry(ovl: Overlay) -> pyfuse3.EntryAttributes:
    """A cacheable "no such name": saves a request per miss (PATH searches, imports, git)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = ovl.config.entry_timeout
    return attr


def getattr_node(ovl: Overlay, node: Node) -> pyfuse3.EntryAttributes:
    if node.parent is None and node.ino != ROOT:
        return _getattr_unlinked(ovl, node)
    try:
        st = ovl.lstat(node)
    except FileNotFoundError:
        return _getattr_unlinked(ovl, node)
    node.st = st
    return entry_attributes(ovl, node, st)


def _getattr_unlinked(ovl: Overlay, node: Node) -> pyfuse3.EntryAttributes:
    """A file without a name we know of that is still open: its data lives on in an open fd.
    The link count is that of the file the fd reaches, as on the kernel's overlay, which stats
    the real inode the removed entry still names: 0 for an upper copy that lost its last name,
    the other names' count for one that has more (a hard link we did not see the kernel
    keep), its own for a lower file removed by a whiteout.  An indexed hard link counts the
    merged names its index keeps (the other names of a lower hard link, once this one went);
    its index entry is a name of its own, and a lower fd cannot tell about an upper copy: 0
    where no count says more."""
    upper_fd = ovl.open_fd(node, writable_layer=True) if node.upper else -1
    fd = upper_fd if upper_fd >= 0 else ovl.open_fd(node)
    if fd < 0:
        raise pyfuse3.FUSEError(errno.ENOENT)
    attr = entry_attributes(ovl, node, os.fstat(fd), fd)
    if node.index is not None:
        attr.st_nlink = index.nlink(ovl, node) or 0
    elif node.upper and upper_fd < 0:
        attr.st_nlink = 0
    return attr


def setattr_node(ovl: Overlay, node: Node, attr: pyfuse3.EntryAttributes,
                 fields: pyfuse3.SetattrFields, fh: int | None) -> pyfuse3.EntryAttributes:
    """chmod, chown, truncate and utimens: on the upper copy, copied up first.

    An fd from the request is used only when it is an upper fd (an unlinked open file has no
    name left); a read-only fd may still point into a lower layer, which must never change.
    """
    from .file import upper_handle_fd  # file.py imports this module for attributes
    ovl.require_writable()
    ovl.changed(node)
    chown = disk_owner(ovl, attr, fields)
    fd = upper_handle_fd(ovl, fh) if fh is not None else -1
    if (fd < 0 and ovl.config.writeback and node.parent is None and node.ino != ROOT
            and not node.upper and _times_only(fields)):
        # the writeback cache's kernel passing on the times it keeps (fuse_flush_times, also
        # after an unlink or a rename over the file): a lower file with no name left has
        # nothing to keep them on (a copy would have no name either, and would show the
        # copy's link count), and an error here would come back from a close
        return getattr_node(ovl, node)
    if fd < 0 and node.parent is None and ovl.inofiles is not None:
        fd = ovl.inofiles.upper_fd(node)  # a nameless file: only its pinned fd reaches it
    if (fd < 0 and ovl.config.writeback and node.parent is None and node.ino != ROOT
            and _times_only(fields)):
        # the same for a nameless upper file that no fd reaches
        return getattr_node(ovl, node)
    if fd < 0:
        copy_up(ovl, node)
    set_mode = fields.update_mode
    if ovl.overrides.active and override.applies(node.kind) and (set_mode or chown is not None):
        _set_override(ovl, fd, node, attr, fields, chown)
        set_mode, chown = False, None
    if fd < 0:
        _setattr_path(ovl, node, attr, fields, set_mode, chown)
    else:
        _setattr_fd(ovl, fd, node, attr, fields, set_mode, chown)
    return getattr_node(ovl, node)


def _set_override(ovl: Overlay, fd: int, node: Node, attr: pyfuse3.EntryAttributes,
                  fields: pyfuse3.SetattrFields, chown: tuple[int, int] | None) -> None:
    """chmod and chown with ``xattr_permissions``: the upper entry's override xattr changes,
    the backing file keeps the daemon's owner and mode (fuse-overlayfs' do_chmod/do_chown)."""
    if fd >= 0:
        target, follow = fd, True
    elif node.ino == ROOT:
        target, follow = fmt.proc_path(ovl.upper.root_fd, b""), True
    else:
        dirfd, name = ovl.location(node)
        target, follow = fmt.proc_path(dirfd, name), False
    current = ovl.overrides.read(0, target, follow)
    if current is None:
        st = os.stat(target, follow_symlinks=follow)
        current = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    uid, gid, mode = current
    if chown is not None:
        uid = uid if chown[0] == -1 else chown[0]
        gid = gid if chown[1] == -1 else chown[1]
    if fields.update_mode:
        mode = stat.S_IMODE(attr.st_mode)
    ovl.overrides.write(target, follow, uid, gid, mode)


def disk_owner(ovl: Overlay, attr: pyfuse3.EntryAttributes,
               fields: pyfuse3.SetattrFields) -> tuple[int, int] | None:
    """The on-disk (uid, gid) a chown asks for (-1: unchanged), None when it changes neither.

    A shown ID that no ``uidmapping=``/``gidmapping=`` range maps has no on-disk ID: EINVAL,
    what chown(2) says of an ID the caller's namespace does not map (see idmap.py).
    """
    if not (fields.update_uid or fields.update_gid):
        return None
    owners = ovl.config.owners
    uid = owners.disk_uid(attr.st_uid) if fields.update_uid else -1
    gid = owners.disk_gid(attr.st_gid) if fields.update_gid else -1
    if uid is None or gid is None:
        raise pyfuse3.FUSEError(errno.EINVAL)
    return uid, gid


def _chown(ovl: Overlay, change, *args, **kwargs) -> None:
    """Apply a chown; with squashing on, a chown the upper refuses (EPERM as a normal user,
    EINVAL in a user namespace that lacks the ID) is no error: fuse-overlayfs' rule, the
    owners shown are made up anyway."""
    try:
        change(*args, **kwargs)
    except OSError as e:
        if not ovl.config.owners.squashed or e.errno not in (errno.EPERM, errno.EINVAL):
            raise


def _times_only(fields: pyfuse3.SetattrFields) -> bool:
    return not (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid)


def _setattr_fd(ovl: Overlay, fd: int, node: Node, attr: pyfuse3.EntryAttributes,
                fields: pyfuse3.SetattrFields, set_mode: bool,
                chown: tuple[int, int] | None) -> None:
    if fields.update_size:
        os.ftruncate(fd, attr.st_size)
    if set_mode:
        os.fchmod(fd, stat.S_IMODE(attr.st_mode))
    if chown is not None:
        _chown(ovl, os.fchown, fd, *chown)
    if fields.update_atime or fields.update_mtime:
        st = os.fstat(fd)
        os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))


def _setattr_path(ovl: Overlay, node: Node, attr: pyfuse3.EntryAttributes,
                  fields: pyfuse3.SetattrFields, set_mode: bool,
                  chown: tuple[int, int] | None) -> None:
    if node.ino == ROOT:
        # the upper root itself: reach it through its held fd (a directory, never a symlink)
        dirfd, name, follow = None, b"/proc/self/fd/%d" % ovl.upper.root_fd, True
    else:
        dirfd, name = ovl.location(node)
        follow = False
    if fields.update_size:
        wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            os.ftruncate(wfd, attr.st_size)
        finally:
            os.close(wfd)
    if set_mode:
        if node.kind == stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        os.chmod(name, stat.S_IMODE(attr.st_mode), dir_fd=dirfd)
    if chown is not None:
        _chown(ovl, os.chown, name, *chown, dir_fd=dirfd, follow_symlinks=follow)
    if fields.update_atime or fields.update_mtime:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=follow)
        os.utime(name, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                           attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                 dir_fd=dirfd, follow_symlinks=follow)
