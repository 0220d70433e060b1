"""The on-disk layer format shared by every backend: whiteouts, opaque dirs, redirects, xattrs.

It is the kernel's format (Documentation/filesystems/overlayfs.rst), so a layer written by one
backend mounts unchanged in the other.  Everything that reads or writes a marker goes through
here; the rest of the package never spells an xattr name itself.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable

from . import xattrat

# One namespace per mount, as the kernel: trusted.overlay.* as root, user.overlay.* for a user
# (or with the userxattr option).  The other namespace's names are ordinary xattrs, never
# markers, so a user cannot forge markers for a root mount through user.* xattrs.
TRUSTED_PREFIX = b"trusted.overlay."
USER_PREFIX = b"user.overlay."

# OCI/aufs whiteout forms, read (never written) so container layers mount as they are.
WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

# Our own addition: the overlay inode number an entry had before it was copied up, so that
# st_ino (which FUSE also uses as the node id) survives copy-up and remounts.  The kernel hides
# every name under its private prefixes and ignores names it does not know.
INO_XATTR = b"ovf.ino"

# Our record of what a layer holds that not every reader can follow, on the layer's root dir in
# the namespace its markers use (so its presence also names that namespace).  The value lists
# feature words, comma-separated; it only ever grows, and is written (and synced) before the
# first marker it announces, so after a crash it may claim too much, never too little.
FEATURES_XATTR = b"ovf.features"
REDIRECT = "redirect"    # a renamed directory's ``redirect`` (kernel: redirect_dir=on/follow)
INDEX = "index"          # a hard-link index entry in the work dir (kernel: index=on)
XWHITEOUT = "xwhiteout"  # whiteouts in the xattr form (kernel: 6.7 and later)


def default_prefix(userxattr: bool = False) -> bytes:
    """The namespace the kernel would use: trusted as root, user otherwise or with userxattr."""
    return TRUSTED_PREFIX if os.geteuid() == 0 and not userxattr else USER_PREFIX


def is_private_xattr(name: bytes, prefix: bytes) -> bool:
    """Overlay bookkeeping in the mount's namespace: never copied up as user data."""
    return name.startswith(prefix)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """The kernel's native whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def proc_path(dirfd: int, name: bytes) -> bytes:
    """A path that reaches ``name`` inside the held directory ``dirfd`` without any path walk.

    Used for the xattr calls, which have no ``*at`` form; only ``name``'s own last component is
    resolved, and callers pass ``follow_symlinks=False`` so that is never followed either.
    """
    if not name:
        return b"/proc/self/fd/%d" % dirfd
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def get_xattr(dirfd: int, name: bytes, attr: bytes) -> bytes | None:
    """The value of ``attr`` on ``name`` in ``dirfd``, or None when absent or unsupported."""
    try:
        # with no name the magic link itself must be followed to reach the directory
        return os.getxattr(proc_path(dirfd, name), attr, follow_symlinks=not name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def overlay_xattrs(dirfd: int, name: bytes, prefix: bytes) -> dict[bytes, bytes]:
    """All overlay xattrs of an entry in the mount's namespace, keyed without the prefix.

    One listxattr answers "none" for most entries, which keeps lookups to a syscall or two.
    """
    path = proc_path(dirfd, name)
    try:
        names = xattrat.listxattrat(dirfd, name) if name else None
        if names is None:
            names = [n.encode("utf-8", "surrogateescape")
                     for n in os.listxattr(path, follow_symlinks=not name)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.ENOENT):
            return {}
        raise
    found: dict[bytes, bytes] = {}
    for battr in names:
        if battr.startswith(prefix):
            try:
                found[battr[len(prefix):]] = os.getxattr(path, battr, follow_symlinks=not name)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EPERM, errno.EACCES):
                    raise
    return found


def decode_features(value: bytes) -> frozenset[str]:
    """The feature words of a ``FEATURES_XATTR`` value (unknown words are kept: a newer writer
    may know more, and a reader must not take a record it does not understand for an empty one)."""
    return frozenset(w for w in value.decode("ascii", "replace").split(",") if w)


def encode_features(features: frozenset[str] | set[str]) -> bytes:
    return ",".join(sorted(features)).encode("ascii")


def add_features(dirfd: int, prefix: bytes, features: frozenset[str] | set[str],
                 durable: bool) -> frozenset[str]:
    """Make the record on the layer root ``dirfd`` (any fd, O_PATH too) list ``features``
    besides what it lists; written only when that changes (or it is absent), and then synced
    when ``durable``.  Returns the features now recorded."""
    value = get_overlay_xattr(dirfd, b"", FEATURES_XATTR, prefix)
    have = decode_features(value) if value is not None else frozenset()
    want = have | frozenset(features)
    if value is None or want != have:
        set_overlay_xattr(dirfd, b"", prefix, FEATURES_XATTR, encode_features(want))
        if durable:
            fd = os.open(proc_path(dirfd, b""), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return want


def opaque_in(marks: dict[bytes, bytes]) -> bool:
    """``opaque=y`` hides the layers below; ``x`` (kernel 6.7) only flags xattr whiteouts."""
    return marks.get(b"opaque") == b"y"


def has_opaque_marker(dirfd: int, name: bytes) -> bool:
    """The OCI form of an opaque dir: a ``.wh..wh..opq`` file inside it."""
    path = name + b"/" + OPAQUE_MARKER if name else OPAQUE_MARKER
    try:
        os.stat(path, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return False
    return True


def get_overlay_xattr(dirfd: int, name: bytes, key: bytes, prefix: bytes | None = None) -> bytes | None:
    """Read an overlay xattr in the mount's namespace (default: this process's, as the kernel)."""
    return get_xattr(dirfd, name, (prefix or default_prefix()) + key)


def set_overlay_xattr(dirfd: int, name: bytes, prefix: bytes, key: bytes, value: bytes) -> None:
    os.setxattr(proc_path(dirfd, name), prefix + key, value, follow_symlinks=not name)


def is_opaque(dirfd: int, name: bytes, prefix: bytes) -> bool:
    """An opaque dir hides everything below it: xattr ``opaque=y`` or the OCI marker file.

    The value ``x`` (kernel 6.7) only says the dir may hold xattr whiteouts; it is not opaque.
    """
    return get_overlay_xattr(dirfd, name, b"opaque", prefix) == b"y" or \
        has_opaque_marker(dirfd, name)


def has_xattr_whiteout_shape(st: os.stat_result) -> bool:
    """An empty regular file: what the kernel's xattr whiteout looks like before its
    ``whiteout`` xattr decides."""
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def is_xattr_whiteout(dirfd: int, name: bytes, st: os.stat_result,
                      prefix: bytes | None = None) -> bool:
    """The kernel's whiteout for nested overlays: an empty regular file with ``whiteout``."""
    return (has_xattr_whiteout_shape(st)
            and get_overlay_xattr(dirfd, name, b"whiteout", prefix) is not None)


def make_whiteout(dirfd: int, name: bytes, prefix: bytes,
                  announce: Callable[[], None] | None = None) -> bool:
    """Write a whiteout: the kernel's char 0/0, or where mknod is refused (an upper on a
    filesystem such as overlayfs or FUSE), the kernel's other form: an empty file with the
    ``whiteout`` xattr, after calling ``announce`` (to record ``XWHITEOUT``).  Returns True for
    the xattr form: its final parent directory must then be flagged with
    ``mark_xattr_whiteouts``, or the kernel will not look for it."""
    try:
        os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dirfd)
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    if announce is not None:
        announce()
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o000, dir_fd=dirfd)
    try:
        os.setxattr(fd, prefix + b"whiteout", b"y")
    except OSError:
        os.close(fd)
        os.unlink(name, dir_fd=dirfd)
        raise
    os.close(fd)
    return True


def mark_xattr_whiteouts(dirfd: int, prefix: bytes) -> None:
    """Flag a directory as holding xattr whiteouts (``opaque=x``) unless it is opaque anyway."""
    if get_overlay_xattr(dirfd, b"", b"opaque", prefix) != b"y":
        set_overlay_xattr(dirfd, b"", prefix, b"opaque", b"x")
