"""Attributes as the kernel's overlayfs reports them (inode.c): getattr and setattr."""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from . import index
from .copy_up import copy_up
from .inodes import ROOT, Node
from .overlay import Overlay


def entry_attributes(ovl: Overlay, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
    """Real attributes of the defining entry, with the overlay's inode number and link count."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = node.ino
    attr.generation = ovl.table.generation(node)
    attr.entry_timeout = ovl.config.entry_timeout
    attr.attr_timeout = ovl.config.attr_timeout
    attr.st_mode = st.st_mode
    if node.merged:
        attr.st_nlink = 1  # as the kernel: counting subdirs of every layer isn't worth it
    elif node.nlink_override is not None:
        attr.st_nlink = node.nlink_override
    elif node.index is not None:
        attr.st_nlink = index.nlink(ovl, node) or st.st_nlink
    else:
        attr.st_nlink = st.st_nlink
    attr.st_uid = st.st_uid
    attr.st_gid = st.st_gid
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


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
    """An unlinked file that is still open: its data lives on in an open fd; nlink is 0."""
    fd = ovl.open_fd(node)
    if fd < 0:
        raise pyfuse3.FUSEError(errno.ENOENT)
    attr = entry_attributes(ovl, node, os.fstat(fd))
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
    fd = upper_handle_fd(ovl, fh) if fh is not None else -1
    if fd < 0:
        copy_up(ovl, node)
        _setattr_path(ovl, node, attr, fields)
    else:
        _setattr_fd(fd, node, attr, fields)
    return getattr_node(ovl, node)


def _setattr_fd(fd: int, node: Node, attr: pyfuse3.EntryAttributes,
                fields: pyfuse3.SetattrFields) -> None:
    if fields.update_size:
        os.ftruncate(fd, attr.st_size)
    if fields.update_mode:
        os.fchmod(fd, stat.S_IMODE(attr.st_mode))
    if fields.update_uid or fields.update_gid:
        os.fchown(fd, attr.st_uid if fields.update_uid else -1,
                  attr.st_gid if fields.update_gid else -1)
    if fields.update_atime or fields.update_mtime:
        st = os.fstat(fd)
        os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))


def _setattr_path(ovl: Overlay, node: Node, attr: pyfuse3.EntryAttributes,
                  fields: pyfuse3.SetattrFields) -> None:
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
    if fields.update_mode:
        if node.kind == stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        os.chmod(name, stat.S_IMODE(attr.st_mode), dir_fd=dirfd)
    if fields.update_uid or fields.update_gid:
        os.chown(name, attr.st_uid if fields.update_uid else -1,
                 attr.st_gid if fields.update_gid else -1, dir_fd=dirfd, follow_symlinks=follow)
    if fields.update_atime or fields.update_mtime:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=follow)
        os.utime(name, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                           attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                 dir_fd=dirfd, follow_symlinks=follow)
