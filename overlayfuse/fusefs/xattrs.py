"""Extended attributes (xattrs.c): passed through, the overlay's own names hidden and refused."""
from __future__ import annotations

import errno
import os

import pyfuse3

from .. import format as fmt
from .copy_up import copy_up
from .inodes import Node
from .overlay import Overlay


def _target(ovl: Overlay, node: Node) -> tuple[bytes, bool]:
    """The path for the xattr calls and whether to follow it (only the root's magic link)."""
    dirfd, name = ovl.location(node)
    return fmt.proc_path(dirfd, name), not name


def _refuse_private(name: bytes) -> None:
    if fmt.is_private_xattr(name):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)


def _no_attr(e: OSError) -> None:
    if e.errno == errno.ENODATA:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
    raise e


def getxattr(ovl: Overlay, node: Node, name: bytes) -> bytes:
    _refuse_private(name)
    path, follow = _target(ovl, node)
    try:
        return os.getxattr(path, name, follow_symlinks=follow)
    except OSError as e:
        _no_attr(e)


def listxattr(ovl: Overlay, node: Node) -> list[bytes]:
    path, follow = _target(ovl, node)
    names = (os.fsencode(x) for x in os.listxattr(path, follow_symlinks=follow))
    return [n for n in names if not fmt.is_private_xattr(n)]


def setxattr(ovl: Overlay, node: Node, name: bytes, value: bytes) -> None:
    _refuse_private(name)
    ovl.require_writable()
    copy_up(ovl, node)
    ovl.changed(node)
    path, follow = _target(ovl, node)
    os.setxattr(path, name, value, follow_symlinks=follow)


def removexattr(ovl: Overlay, node: Node, name: bytes) -> None:
    _refuse_private(name)
    ovl.require_writable()
    copy_up(ovl, node)
    ovl.changed(node)
    path, follow = _target(ovl, node)
    try:
        os.removexattr(path, name, follow_symlinks=follow)
    except OSError as e:
        _no_attr(e)
