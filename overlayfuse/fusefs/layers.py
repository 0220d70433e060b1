"""The backing layers and symlink-proof access to directories inside them.

Every backing call the daemon makes is relative to a directory fd obtained here.  Directories
are opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so a symlink planted anywhere in
a layer can never lead a path walk outside it; the last component is then handled by the
caller with an ``*at`` call and ``O_NOFOLLOW``/``follow_symlinks=False``.
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections import OrderedDict
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


PATH_MAX = 4096


def openat2_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """Open ``path`` below ``dirfd`` without following any symlink and without leaving it.

    A path too long for one call (layers may be deeper than PATH_MAX) is walked in parts."""
    if len(path) >= PATH_MAX:
        cut = path.rfind(b"/", 0, PATH_MAX - 1)
        if cut > 0:
            head = openat2_beneath(dirfd, path[:cut], os.O_PATH | os.O_DIRECTORY)
            try:
                return openat2_beneath(head, path[cut + 1:], flags)
            finally:
                os.close(head)
    how = _OpenHow(flags | os.O_CLOEXEC, 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ELOOP:  # a symlink where a directory was expected: not a dir to us
            err = errno.ENOTDIR
        raise OSError(err, os.strerror(err), path)
    return fd


@dataclass
class Layer:
    """One backing directory: the upper (index 0 when present) or a lower."""

    index: int
    path: str
    root_fd: int
    dev: int
    is_upper: bool


class DirFds:
    """A bounded cache of O_PATH fds of backing directories, keyed by (layer, relative path).

    Paths walk from the layer root in one openat2 call; the cache saves that call for the hot
    directories.  Entries for a path and everything below it are dropped when the upper changes
    shape (rename, rmdir), so a cached fd never names a directory that moved.
    """

    def __init__(self, layers: list[Layer], capacity: int = 4096) -> None:
        self._layers = layers
        self._capacity = capacity
        self._fds: OrderedDict[tuple[int, bytes], int] = OrderedDict()

    def get(self, layer: int, path: bytes) -> int:
        """An fd for directory ``path`` ('' is the root) of ``layer``; raises OSError."""
        if not path:
            return self._layers[layer].root_fd
        key = (layer, path)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = openat2_beneath(self._layers[layer].root_fd, path, os.O_PATH | os.O_DIRECTORY)
        self._fds[key] = fd
        if len(self._fds) > self._capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def forget_tree(self, layer: int, path: bytes) -> None:
        """Drop ``path`` and every cached directory below it in ``layer``."""
        prefix = path + b"/"
        for key in [k for k in self._fds if k[0] == layer and (k[1] == path or k[1].startswith(prefix))]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_layers(upper: str | None, lowers: tuple[str, ...]) -> list[Layer]:
    """Open the layer roots, upper first; the fds pin the directories for the mount's life."""
    layers = []
    paths = ([upper] if upper else []) + list(lowers)
    for i, path in enumerate(paths):
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        layers.append(Layer(i, path, fd, os.fstat(fd).st_dev, bool(upper) and i == 0))
    return layers


def split(path: bytes) -> tuple[bytes, bytes]:
    """('a/b', 'c') for 'a/b/c'; ('', 'c') for 'c'."""
    head, _, tail = path.rpartition(b"/")
    return head, tail


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name
