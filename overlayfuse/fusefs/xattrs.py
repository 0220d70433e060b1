"""Extended attributes (xattrs.c): passed through, the overlay's own markers hidden.

As the kernel (>= 6.7) does: names in the overlay's namespace (``trusted.overlay.*`` as root,
``user.overlay.*`` otherwise) are the overlay's bookkeeping and read as absent, but a caller
may still set such a name: it is stored escaped as ``<prefix>overlay.<rest>`` (which is how a
nested overlay keeps its markers) and shown back under the name the caller used.

With ``xattr_permissions`` the override xattrs (override.py) are the overlay's too: absent to
readers, EPERM to writers (fuse-overlayfs' answer), changed by chown and chmod only.
"""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from .. import format as fmt
from . import privs
from .copy_up import copy_up
from .inodes import Node
from .overlay import Overlay


def _target(ovl: Overlay, node: Node, change: bool = False) -> tuple[bytes, bool]:
    """The path for the xattr calls and whether to follow it (only a magic link: the root,
    or an open file whose last name is gone, reached through its descriptor)."""
    try:
        dirfd, name = ovl.location(node)
    except pyfuse3.FUSEError as e:
        fd = ovl.open_fd(node, writable_layer=change)
        if e.errno != errno.ENOENT or fd < 0:
            raise
        return fmt.proc_path(fd, b""), True
    return fmt.proc_path(dirfd, name), not name


def _real_name(ovl: Overlay, name: bytes) -> bytes:
    """The name stored on the backing entry for the name a caller uses."""
    if name.startswith(ovl.prefix):
        return ovl.prefix + b"overlay." + name[len(ovl.prefix):]
    return name


def _shown_name(ovl: Overlay, real: bytes) -> bytes | None:
    """The name a caller sees for a stored one, or None for the overlay's own markers."""
    if not real.startswith(ovl.prefix):
        return real
    rest = real[len(ovl.prefix):]
    if rest.startswith(b"overlay."):
        return ovl.prefix + rest[len(b"overlay."):]
    return None


def _require_xattrs(ovl: Overlay) -> None:
    """With ``noxattrs=1`` the mount has no xattrs: ENOSYS, which the kernel remembers for the
    mount and answers EOPNOTSUPP itself from then on (fuse-overlayfs' reply too)."""
    if not ovl.config.xattrs:
        raise pyfuse3.FUSEError(errno.ENOSYS)


def _no_attr(e: OSError) -> None:
    if e.errno == errno.ENODATA:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
    raise e


def _refuse_override(ovl: Overlay, name: bytes) -> None:
    """An override xattr (``xattr_permissions``, override.py) is changed by chown and chmod
    only: EPERM, fuse-overlayfs' answer for its own names."""
    if ovl.overrides.hidden(name):
        raise pyfuse3.FUSEError(errno.EPERM)


CAPS = b"security.capability"
NO_CAPS_MAX = 4096
# ino -> the node last found without file capabilities.  The kernel asks for them before
# every write (its killpriv check: FUSE never marks an inode S_NOSEC), so the answer is kept;
# only a setxattr through the mount can add them (changes behind its back are undefined, as
# on the kernel's overlay).  Keyed by ino but checked by identity: a node id the kernel forgot
# and a new file reused is a new Node.
_no_caps: dict[int, Node] = {}


def getxattr(ovl: Overlay, node: Node, name: bytes) -> bytes:
    _require_xattrs(ovl)
    if name == CAPS and _no_caps.get(node.ino) is node:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
    if ovl.overrides.hidden(name):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
    path, follow = _target(ovl, node)
    try:
        return os.getxattr(path, _real_name(ovl, name), follow_symlinks=follow)
    except OSError as e:
        if name == CAPS and e.errno == errno.ENODATA:
            if len(_no_caps) >= NO_CAPS_MAX:
                _no_caps.clear()
            _no_caps[node.ino] = node
        _no_attr(e)


def listxattr(ovl: Overlay, node: Node) -> list[bytes]:
    _require_xattrs(ovl)
    path, follow = _target(ovl, node)
    shown = (_shown_name(ovl, os.fsencode(x)) for x in os.listxattr(path, follow_symlinks=follow))
    return [name for name in shown if name is not None and not ovl.overrides.hidden(name)]


def setxattr(ovl: Overlay, node: Node, name: bytes, value: bytes,
             caller_pid: int = 0) -> None:
    _require_xattrs(ovl)
    _refuse_override(ovl, name)
    ovl.require_writable()
    _no_caps.pop(node.ino, None)
    copy_up(ovl, node)
    ovl.changed(node)
    path, follow = _target(ovl, node, change=True)
    os.setxattr(path, _real_name(ovl, name), value, follow_symlinks=follow)
    if name == ACL_ACCESS and caller_pid:
        _kill_sgid_unless_in_group(path, follow, caller_pid)


ACL_ACCESS = b"system.posix_acl_access"


def _kill_sgid_unless_in_group(path, follow: bool, pid: int) -> None:
    """Setting an access ACL clears the setgid bit when the caller is neither in the file's
    group nor holds CAP_FSETID (the kernel's posix_acl_update_mode).  The kernel's FUSE asks
    for that only through FUSE_SETXATTR_ACL_KILL_SGID, which pyfuse3's setxattr never sees,
    and the daemon's own setxattr, as root, keeps the bit (xfstests generic/375)."""
    st = os.stat(path, follow_symlinks=follow)
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & stat.S_ISGID:
        return
    if not privs.keeps_setgid(pid, st.st_gid):  # a caller that is gone keeps it
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)  # not a symlink: checked


def removexattr(ovl: Overlay, node: Node, name: bytes) -> None:
    _require_xattrs(ovl)
    _refuse_override(ovl, name)
    ovl.require_writable()
    getxattr(ovl, node, name)  # as the kernel: a missing name fails before any copy-up
    copy_up(ovl, node)
    ovl.changed(node)
    path, follow = _target(ovl, node, change=True)
    try:
        os.removexattr(path, _real_name(ovl, name), follow_symlinks=follow)
    except OSError as e:
        _no_attr(e)
