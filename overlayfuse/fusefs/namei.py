"""Lookup across layers: the first match from the top wins, as in the kernel's namei.c.

A whiteout hides the name; a non-directory ends the search; directories merge downwards until
an opaque one; a ``redirect`` on a renamed directory says where its lower part lives.
"""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from .. import format as fmt
from . import index, origin
from .inodes import Node, in_parent_lower
from .layers import join, split
from .overlay import Overlay

NAME_MAX = 255
FIRST_LOWER_MIN = 4  # lowers under a dir before a lookup starts at the first that has the name


def _lstat(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _marks_unless_whiteout(ovl: Overlay, dirfd: int, name: bytes,
                           st: os.stat_result) -> dict[bytes, bytes] | None:
    """None for a whiteout (char 0/0, or an empty file with ``whiteout``); otherwise the
    entry's overlay xattrs, which lookup needs anyway: one listxattr answers both."""
    if fmt.is_whiteout_stat(st):
        return None
    if not (stat.S_ISDIR(st.st_mode) or _may_carry_ino(st)):
        return {}
    marks = fmt.overlay_xattrs(dirfd, name, ovl.prefix)
    if b"whiteout" in marks and fmt.has_xattr_whiteout_shape(st):
        return None
    return marks


def _oci_whiteout(dirfd: int, name: bytes) -> bool:
    """``.wh.NAME`` beside a missing NAME (container layers); such a name can't exceed NAME_MAX."""
    return len(name) <= NAME_MAX - len(fmt.WH_PREFIX) and \
        _lstat(dirfd, fmt.WH_PREFIX + name) is not None


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)


def resolve(ovl: Overlay, parent: Node, name: bytes) -> tuple[Node, os.stat_result] | None:
    """The merged entry ``name`` in directory ``parent`` as a fresh (unbound) node and the stat
    of the entry that defines its attributes, or None when it does not exist."""
    found = _resolve(ovl, parent, name)
    if found is not None:
        found[0].st = found[1]
    return found


def _resolve(ovl: Overlay, parent: Node, name: bytes) -> tuple[Node, os.stat_result] | None:
    check_name(name)
    if name.startswith(fmt.WH_PREFIX):
        return None  # OCI markers are bookkeeping, never entries of the merged tree
    top: os.stat_result | None = None
    node: Node | None = None
    lookup_name = name
    abs_redirect: bytes | None = None
    if parent.upper:
        udir = ovl.upper_dirfd(parent)
        st = _lstat(udir, name)
        if st is None and _oci_whiteout(udir, name):
            return None
        if st is not None:
            marks = _marks_unless_whiteout(ovl, udir, name, st)
            if marks is None:
                return None
            ino = _saved_ino(marks) or _origin_ino(ovl, marks)
            if not stat.S_ISDIR(st.st_mode):
                node = Node(ino or ovl.encode_ino(0, st.st_ino), stat.S_IFMT(st.st_mode))
                node.upper = True
                fh = marks.get(b"origin")
                if st.st_nlink > 1 and fh and index.lookup(ovl, origin.index_name(fh), st):
                    node.index = origin.index_name(fh)
                elif b"nlink" in marks:
                    node.nlink_override = _kernel_nlink(marks[b"nlink"], st)
                return node, st
            top = st
            node = Node(ino or ovl.encode_ino(0, st.st_ino), stat.S_IFDIR)
            node.upper = True
            if fmt.opaque_in(marks) or fmt.has_opaque_marker(udir, name):
                node.opaque = True
                return node, st
            abs_redirect, lookup_name = _follow_redirect(marks, abs_redirect, lookup_name)
    parent_paths = dict(parent.lower)
    stack: list[tuple[int, bytes]] = []
    layers = ovl.lower_indexes
    if abs_redirect is None and len(parent.lower) >= FIRST_LOWER_MIN:
        first = ovl.first_lower(parent)
        if first is not None:
            start = first.get(lookup_name)
            layers = layers[ovl.lower_pos[start]:] if start is not None else []
    for li in layers:
        if abs_redirect is not None:
            dir_path, entry = split(abs_redirect)
        else:
            dir_path = parent_paths.get(li)
            if dir_path is None:
                continue
            entry = lookup_name
        names = ovl.lower_names(li, dir_path)
        if names is not None and entry not in names:
            if fmt.WH_PREFIX + entry in names:
                break  # OCI whiteout
            continue
        try:
            dfd = ovl.dirfds.get(li, dir_path)
        except OSError:
            continue
        st = _lstat(dfd, entry)
        if st is None:
            if names is None and _oci_whiteout(dfd, entry):
                break
            continue
        marks = _marks_unless_whiteout(ovl, dfd, entry, st)
        if marks is None:
            break
        if not stat.S_ISDIR(st.st_mode):
            if top is None:
                # a hard-linked file may be reached later by a name it has nowhere in the
                # lowers: keep the path it was found by
                derive = abs_redirect is None and entry == name and st.st_nlink == 1
                where = in_parent_lower(li) if derive else [(li, join(dir_path, entry))]
                return _lower_nondir(ovl, dfd, entry, li, where, st, marks)
            break  # a non-directory below a directory ends the merge
        stack.append((li, join(dir_path, entry)))
        if top is None:
            top = st
            node = Node(_saved_ino(marks) or ovl.encode_ino(li, st.st_ino), stat.S_IFDIR)
        if fmt.opaque_in(marks) or fmt.has_opaque_marker(dfd, entry):
            break
        if li != ovl.lower_indexes[-1]:  # the bottom layer's redirect leads nowhere: unread
            abs_redirect, lookup_name = _follow_redirect(marks, abs_redirect, lookup_name)
    if node is None:
        return None
    node.lower = stack
    return node, top


def _follow_redirect(marks: dict[bytes, bytes], abs_redirect: bytes | None,
                     lookup_name: bytes) -> tuple[bytes | None, bytes]:
    """Where the layers below continue after a dir with a ``redirect``: an absolute path from
    the layer roots, or another name in the same parent (which stays relative to an absolute
    redirect already taken)."""
    redirect = marks.get(b"redirect")
    if not redirect:
        return abs_redirect, lookup_name
    check_redirect(redirect)
    if redirect.startswith(b"/"):
        return redirect.strip(b"/"), lookup_name
    if abs_redirect is not None:
        return join(split(abs_redirect)[0], redirect), lookup_name
    return None, redirect


def check_redirect(redirect: bytes) -> None:
    """The kernel's rules, so a crafted redirect cannot walk out of the layers: a relative
    redirect is one name and an absolute one has no empty component, else EINVAL (util.c);
    a "." or ".." component is EACCES, as the kernel's lookup of such a name answers."""
    if redirect.startswith(b"/"):
        parts = redirect[1:].split(b"/")
        if not all(parts):
            raise pyfuse3.FUSEError(errno.EINVAL)
    elif b"/" in redirect:
        raise pyfuse3.FUSEError(errno.EINVAL)
    else:
        parts = [redirect]
    if b"." in parts or b".." in parts:
        raise pyfuse3.FUSEError(errno.EACCES)


def _lower_nondir(ovl: Overlay, dirfd: int, name: bytes, li: int, where: list,
                  st: os.stat_result, marks: dict[bytes, bytes]) -> tuple[Node, os.stat_result]:
    # a lower layer may be a former upper (layer store snapshots): its copied-up entries keep
    # the inode number they had when they were copied up
    ino = _saved_ino(marks)
    node = Node(ino or ovl.encode_ino(li, st.st_ino), stat.S_IFMT(st.st_mode))
    node.lower = where
    if st.st_nlink > 1 and ovl.index_fd >= 0:
        # an earlier copy-up of another name of this inode holds the current data
        fh = ovl.origin_of(li, dirfd, name)
        ist = index.lookup(ovl, origin.index_name(fh), kind=stat.S_IFMT(st.st_mode)) \
            if fh else None
        if ist is not None:
            node.index = origin.index_name(fh)
            return node, ist
    return node, st


def _origin_ino(ovl: Overlay, marks: dict[bytes, bytes]) -> int | None:
    """The inode number of an entry the kernel copied up: that of its lower origin, as the
    kernel reports it (entries copied up here carry ``ovf.ino`` instead)."""
    value = marks.get(b"origin")
    if not value:
        return None
    parts = origin.decode(value)
    if parts is None:
        return None
    for li in ovl.lower_indexes:
        if ovl.layer_uuid(li) != parts[1]:
            continue
        fd = origin.open_origin(value, ovl.layers[li].root_fd)
        if fd is not None:
            try:
                return ovl.encode_ino(li, os.fstat(fd).st_ino)
            finally:
                os.close(fd)
    return None


def _kernel_nlink(value: bytes, st: os.stat_result) -> int | None:
    """The kernel's ``nlink`` xattr on an indexed upper file: ``U-1`` means the upper link
    count less one (its index entry).  The lower-relative form needs the origin: ignored."""
    if value[:1] != b"U":
        return None
    try:
        return max(st.st_nlink + int(value[1:]), 1)
    except ValueError:
        return None


def _may_carry_ino(st: os.stat_result) -> bool:
    """Only files and dirs can hold user.* xattrs; as root every type can hold trusted.*."""
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) or os.geteuid() == 0


def _saved_ino(marks: dict[bytes, bytes]) -> int | None:
    value = marks.get(fmt.INO_XATTR)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def lookup(ovl: Overlay, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
    """Resolve and register with the kernel (one lookup count); ENOENT when absent."""
    found = resolve(ovl, parent, name)
    if found is None:
        raise pyfuse3.FUSEError(errno.ENOENT)
    fresh, st = found
    table = ovl.table
    if table.stays_cold(parent, name, fresh):
        table.count_cold(parent, name, fresh)  # no Node until a request needs one
        return fresh, st
    node = table.bind(parent, name, fresh)
    node.lookups += 1
    return node, st
