"""Clearing setuid and setgid where the kernel's FUSE client leaves the rule half applied.

On the kernel's overlay (any local filesystem) a caller without CAP_FSETID who changes a
file's data (write, truncate, fallocate, an O_TRUNC open) clears its setuid bit, and its
setgid bit where the group may execute it *or the caller is not in the file's group*; a
chmod by a caller outside the file's group drops setgid as well (the VFS's
``setattr_should_drop_sgid`` and ``setattr_copy``).  The daemon makes every change with its
own credentials, so the backing filesystem applies none of this, and the kernel's FUSE client
(without ``handle_killpriv``) passes only part of it on: it sends the mode with setuid and
group-executable setgid cleared, an empty SETATTR where that leaves nothing to clear, and
nothing at all for an O_TRUNC open it lets the OPEN do (``atomic_o_trunc``).  Each request
names its caller (uid, gid, pid), so the daemon completes the rule here.  The caller's other
groups and its capabilities come from ``/proc/PID/status``, read only when a setgid (or, on
an O_TRUNC open, setuid) bit is at stake and the caller's own gid is not the file's.  Setting
an access ACL meets the same group test (xattrs.py).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

import pyfuse3

from . import attrs
from .inodes import Node
from .overlay import Overlay

CAP_FSETID = 4


@dataclass(frozen=True)
class _ModeOnly:
    """Setattr fields that change the mode alone (pyfuse3's own cannot be made here)."""

    update_mode: bool = True
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


MODE_ONLY = _ModeOnly()


def _status(pid: int) -> dict[str, str] | None:
    """The caller's /proc status fields; None when it is gone (or no process asked)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None


def _has_fsetid(status: dict[str, str]) -> bool:
    return bool(int(status.get("CapEff", "0"), 16) >> CAP_FSETID & 1)


def keeps_setgid(pid: int, gid: int, fsgid: int = -1,
                 status: dict[str, str] | None = None) -> bool:
    """Whether the caller ``pid`` (whose fsgid the request may name) may keep a setgid bit
    of group ``gid``: a member of the group, or one holding CAP_FSETID (the VFS's
    ``in_group_or_capable``).  A caller that cannot be looked up keeps it: the daemon then
    does what the kernel's FUSE client asked."""
    if fsgid == gid:
        return True
    status = status or _status(pid)
    if status is None:
        return True
    members = status.get("Groups", "").split() + status.get("Gid", "").split()[1:2]
    return str(gid) in members or _has_fsetid(status)


def setattr_node(ovl: Overlay, node: Node, attr: pyfuse3.EntryAttributes,
                 fields: pyfuse3.SetattrFields, fh: int | None,
                 ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
    """attrs.setattr_node with setgid dropped where the caller may not keep it: from the mode
    the kernel sends after a change (setuid cleared, setgid kept; a chmod meets the same
    test, which the kernel's client has made already), and after a truncate or the empty
    SETATTR the kernel sends after a change, from a file whose setgid bit only the group
    test clears.  The file's mode is read only where a setgid bit is at stake."""
    if fields.update_mode:
        if attr.st_mode & stat.S_ISGID:
            gid = attr.st_gid if fields.update_gid else attrs.getattr_node(ovl, node).st_gid
            if not keeps_setgid(ctx.pid, gid, ctx.gid):
                attr.st_mode &= ~stat.S_ISGID
        return attrs.setattr_node(ovl, node, attr, fields, fh)
    result = attrs.setattr_node(ovl, node, attr, fields, fh)
    if (fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime
            or fields.update_ctime):
        return result
    mode = result.st_mode
    if (not stat.S_ISREG(mode) or mode & (stat.S_ISGID | stat.S_IXGRP) != stat.S_ISGID
            or keeps_setgid(ctx.pid, result.st_gid, ctx.gid)):
        return result
    return _chmod(ovl, node, mode & ~stat.S_ISGID, fh)


def after_truncating_open(ovl: Overlay, node: Node, ctx: pyfuse3.RequestContext) -> None:
    """An O_TRUNC open truncated the file: clear what a truncate by this caller clears."""
    current = attrs.getattr_node(ovl, node)
    mode = current.st_mode
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return
    status = _status(ctx.pid)
    if status is None or _has_fsetid(status):
        return
    new = mode & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP
                                or not keeps_setgid(ctx.pid, current.st_gid, ctx.gid, status)):
        new &= ~stat.S_ISGID
    if new != mode:
        _chmod(ovl, node, new, None)


def _chmod(ovl: Overlay, node: Node, mode: int, fh: int | None) -> pyfuse3.EntryAttributes:
    change = pyfuse3.EntryAttributes()
    change.st_mode = mode
    return attrs.setattr_node(ovl, node, change, MODE_ONLY, fh)
