"""The pyfuse3 Operations class: a thin dispatcher over the modules that own each concern.

Every handler goes through ``_errors``: an ``OSError`` becomes the same errno for the caller,
anything else is logged and becomes EIO.  Nothing else may escape a handler, because pyfuse3
ends the filesystem on any other exception and leaves a dead mount behind (PYFUSE3-FACTS).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable

import pyfuse3
import trio

from . import (attrs, dir as dirops, export, file as fileops, privs, readdir as readdirops,
               xattrs)
from .inodes import ROOT
from .gate import Gate
from .inofiles import InodeFiles
from .namei import lookup
from .overlay import Overlay

log = logging.getLogger(__name__)


def _errors(handler):
    @functools.wraps(handler)
    async def wrapper(self, *args, **kwargs):
        gate = self.gate
        await gate.enter()
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            gate.leave()
    return wrapper


def _caller(ovl: Overlay, ctx: pyfuse3.RequestContext) -> dirops.Caller:
    return dirops.Caller.of_request(ovl, ctx.uid, ctx.gid, ctx.umask)


class OverlayOperations(pyfuse3.Operations):
    """The overlay as pyfuse3 sees it; ``ovl`` holds the state, the modules hold the rules."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    # O_DIRECT requests one at a time, so that the kernel drops the pages a direct write made
    # stale once it returns, aio writes included (tools/pyfuse3/async-dio.patch; file.py)
    enable_async_dio = False
    # -o readdirplus_auto: the kernel asks plain READDIR where it will not use the attributes
    enable_readdirplus_auto = False

    def __init__(self, ovl: Overlay, zero_dirs: bool = False, zero_opens: bool = False
                 ) -> None:
        super().__init__()
        self.ovl = ovl
        self.gate = Gate()  # a layer switch (switch.py) waits for the running requests
        # as root, POSIX ACLs are honoured as on the kernel's overlay: the kernel checks them
        # (default_permissions is on anyway), the backing layers store and inherit them
        self.enable_acl = ovl.config.as_root and ovl.config.acl
        # and the umask is ours then: a default ACL replaces it (dir.Caller.masked)
        self.enable_dont_mask = self.enable_acl
        self._dirs: dict[int, readdirops.DirHandle] = {}
        self._next_dir = 1
        self.after_init: Callable[[], None] | None = None
        # zero-message dirs and file opens (transport.py): OPENDIR (OPEN) answered ENOSYS,
        # dirs (files) named by inode in every later request, O_TRUNC sent as a setattr
        # the kernel's writeback cache (-o writeback=1): pyfuse3 reads this at INIT
        self.enable_writeback_cache = ovl.config.writeback
        self.enable_readdirplus_auto = ovl.config.readdirplus_auto
        self.zero_dirs = zero_dirs or zero_opens
        self.zero_opens = zero_opens
        if self.zero_dirs:
            self.inode_as_fh = True
            ovl.pin_dirs = True
        if zero_opens:
            self.enable_atomic_o_trunc = False
            ovl.inofiles = InodeFiles(ovl)

    def init(self) -> None:
        # called while the kernel's INIT is handled, before the reply that fixes the mount's
        # parameters (readahead among them): what must override those runs just after it
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)

    # -- lookup and attributes -----------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        ovl = self.ovl
        if name == b".":  # the kernel asks for a node id by itself: a file handle (export.py)
            node = export.revive(ovl, parent_inode)
            node.lookups += 1
            return attrs.getattr_node(ovl, node)
        parent = ovl.table.get(parent_inode)
        if name == b"..":
            node = parent.parent or parent
            node.lookups += 1
            return attrs.getattr_node(ovl, node)
        try:
            node, st = lookup(ovl, parent, name)
        except pyfuse3.FUSEError as e:
            if e.errno == errno.ENOENT:
                return attrs.negative_entry(ovl)
            raise
        return attrs.entry_attributes(ovl, node, st)

    async def forget(self, inode_list):
        ovl = self.ovl
        table = ovl.table
        for ino, count in inode_list:
            table.forget(ino, count)
            if not table.holds(ino):
                ovl.forget_inode(ino)

    @_errors
    async def getattr(self, inode, ctx=None):
        return attrs.getattr_node(self.ovl, self.ovl.table.get(inode))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return privs.setattr_node(self.ovl, self.ovl.table.get(inode), attr, fields, fh, ctx)

    @_errors
    async def readlink(self, inode, ctx):
        node = self.ovl.table.get(inode)
        if node.parent is None and node.ino != ROOT:
            # removed while the kernel holds it (an O_PATH fd): the fd pinned at the removal
            # still reaches the link, as the kernel's overlay still reads it
            fd = self.ovl.open_fd(node)
            if fd < 0:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return os.readlink(b"", dir_fd=fd)
        dirfd, name = self.ovl.location(node)
        return os.readlink(name, dir_fd=dirfd)

    @_errors
    async def access(self, inode, mode, ctx):
        return True  # default_permissions: the kernel checks before asking

    @_errors
    async def statfs(self, ctx):
        top = self.ovl.layers[0]
        st = os.statvfs(b"/proc/self/fd/%d" % top.root_fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
            setattr(data, field, getattr(st, field))
        data.f_namemax = 255
        return data

    # -- namespace -------------------------------------------------------------------------
    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        node, st = dirops.mkdir(self.ovl, self.ovl.table.get(parent_inode), name, mode,
                                _caller(self.ovl, ctx))
        return attrs.entry_attributes(self.ovl, node, st)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node, st = dirops.mknod(self.ovl, self.ovl.table.get(parent_inode), name, mode, rdev,
                                _caller(self.ovl, ctx))
        return attrs.entry_attributes(self.ovl, node, st)

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        node, st = dirops.symlink(self.ovl, self.ovl.table.get(parent_inode), name, target,
                                  _caller(self.ovl, ctx))
        return attrs.entry_attributes(self.ovl, node, st)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        table = self.ovl.table
        node, st = dirops.link(self.ovl, table.get(inode), table.get(new_parent_inode), new_name)
        return attrs.entry_attributes(self.ovl, node, st)

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        dirops.unlink(self.ovl, self.ovl.table.get(parent_inode), name)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        dirops.rmdir(self.ovl, self.ovl.table.get(parent_inode), name)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        table = self.ovl.table
        dirops.rename(self.ovl, table.get(parent_inode_old), name_old,
                      table.get(parent_inode_new), name_new, flags)

    # -- files -----------------------------------------------------------------------------
    @_errors
    async def open(self, inode, flags, ctx):
        if self.zero_opens:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # never asked again: fh is the inode
        node = self.ovl.table.get(inode)
        info = await fileops.open_node(self.ovl, node, flags)
        if flags & os.O_TRUNC:
            try:  # the kernel leaves it to OPEN; the file is open by now, its handle given
                privs.after_truncating_open(self.ovl, node, ctx)
            except (OSError, pyfuse3.FUSEError) as e:
                log.warning("setuid/setgid not cleared after an O_TRUNC open: %s", e)
        return info

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        ovl = self.ovl
        flags = fileops.backing_flags(ovl, flags)
        node, st, fd = dirops.create(ovl, ovl.table.get(parent_inode), name, mode, flags,
                                     _caller(ovl, ctx))
        if ovl.inofiles is not None:
            ovl.inofiles.adopt(node, fd, flags)  # file handle 0: requests name the inode
            info = pyfuse3.FileInfo(fh=0, keep_cache=ovl.config.keep_cache)
        else:
            info = fileops.adopt_fd(ovl, node, fd, flags)
        return info, attrs.entry_attributes(ovl, node, st)

    @_errors
    async def read(self, fh, off, size):
        if self.zero_opens:
            return self.ovl.inofiles.read(self.ovl.table.get(fh), off, size)
        return fileops.read(self.ovl, fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        if self.zero_opens:
            return await self.ovl.inofiles.write(self.ovl.table.get(fh), off, buf)
        return await fileops.write(self.ovl, fh, off, buf)

    @_errors
    async def fallocate(self, fh, mode, offset, length):
        # called only by a binding with tools/pyfuse3/fallocate.patch (transport.py); stock
        # pyfuse3 leaves FALLOCATE to libfuse, which answers ENOSYS: EOPNOTSUPP for callers
        if self.zero_opens:
            return await self.ovl.inofiles.fallocate(self.ovl.table.get(fh), mode, offset,
                                                     length)
        await fileops.fallocate(self.ovl, fh, mode, offset, length)

    async def flush(self, fh):
        # nothing to do on close(); ENOSYS tells the kernel never to send FLUSH again,
        # one request less per close (PYFUSE3-FACTS: requests decide the speed)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def fsync(self, fh, datasync):
        if self.zero_opens:
            return await self.ovl.inofiles.fsync(self.ovl.table.get(fh), datasync)
        await fileops.fsync(self.ovl, fh, datasync)

    @_errors
    async def release(self, fh):
        fileops.release(self.ovl, fh)

    # -- directories -----------------------------------------------------------------------
    @_errors
    async def opendir(self, inode, ctx):
        if self.zero_dirs:
            # never asked again: the kernel caches listings (FOPEN_CACHE_DIR) and drops them
            # on its own changes to the dir, which are the only changes there are
            raise pyfuse3.FUSEError(errno.ENOSYS)
        handle = readdirops.open_dir(self.ovl, self.ovl.table.get(inode))
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = handle
        return fh

    @_errors
    async def readdir(self, fh, start_id, token):
        if self.zero_dirs:
            # one listing per directory (overlay.cached_listing), not per open: the kernel
            # reads it from offset 0 whenever its cached copy is gone
            handle = readdirops.DirHandle(self.ovl.table.get(fh), -1)  # no fd: never opened
        else:
            handle = self._dirs[fh]
        readdirops.readdir(self.ovl, handle, start_id, token)

    @_errors
    async def releasedir(self, fh):
        handle = self._dirs.pop(fh, None)
        if handle is not None:
            readdirops.release_dir(self.ovl, handle)

    @_errors
    async def fsyncdir(self, fh, datasync):
        return None

    # -- xattrs ----------------------------------------------------------------------------
    @_errors
    async def getxattr(self, inode, name, ctx):
        return xattrs.getxattr(self.ovl, self.ovl.table.get(inode), name)

    @_errors
    async def listxattr(self, inode, ctx):
        return xattrs.listxattr(self.ovl, self.ovl.table.get(inode))

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        xattrs.setxattr(self.ovl, self.ovl.table.get(inode), name, value, ctx.pid)

    @_errors
    async def removexattr(self, inode, name, ctx):
        xattrs.removexattr(self.ovl, self.ovl.table.get(inode), name)
