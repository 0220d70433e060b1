"""A frozen layer's content identity: the same on every machine that holds the same layer.

sha256 over a walk of the layer directory in byte order of names: for each entry (the root
included) its path, type, permission bits, owner and group as the store's runs see them (a
normal user's store is walked as root of its user namespace, so the subordinate IDs read as
the tree's own), file contents, link targets, device numbers (whiteouts are ``0,0``) and its
xattrs, the overlay ones under one name whatever their namespace (``trusted.overlay.*`` for
root's stores, ``user.overlay.*`` for a user's).  Left out: times, inode numbers, and the
overlay xattrs that hold machine-local facts (``origin`` and ``upper`` file handles, ``impure``,
``nlink``, ``uuid``, and our FUSE daemon's own ``ovf.*``: the inode numbers entries had before
a copy-up, the writer's feature record), so that the same content gives the same identity
whichever machine and backend wrote it.  A layer never changes once frozen, so its identity is computed once, the
first time something needs it (a build on it), and kept in the catalog.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import stat

from .. import format as fmt
from ..sandbox import plan_ids, run_as_mapped_root
from . import catalog as cat
from .disk import Layout

OVERLAY_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
LOCAL_FACTS = {b"origin", b"upper", b"impure", b"nlink", b"uuid"}
OWN_PREFIX = fmt.INO_XATTR.partition(b".")[0] + b"."    # ovf.ino, ovf.features
# the catalog keeps an identity with this version before it; another version is computed anew
VERSION = "2:"


def tree_identity(path: str) -> str:
    """The identity of the tree at ``path``, read as this process sees it."""
    h = hashlib.sha256(b"overlayfuse layer v2\0")
    _entry(h, os.fsencode(path), b".")
    return h.hexdigest()


def _entry(h: "hashlib._Hash", path: bytes, rel: bytes) -> None:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    h.update(b"%s\0%o\0%o\0%d:%d\0" % (rel, kind, stat.S_IMODE(st.st_mode), st.st_uid,
                                        st.st_gid))
    for name, value in _xattrs(path):
        h.update(b"x%s\0%d\0%s" % (name, len(value), value))
    if stat.S_ISREG(kind):
        h.update(b"f%d\0" % st.st_size)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    elif stat.S_ISLNK(kind):
        h.update(b"l" + os.readlink(path) + b"\0")
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        h.update(b"r%d,%d\0" % (os.major(st.st_rdev), os.minor(st.st_rdev)))
    elif stat.S_ISDIR(kind):
        h.update(b"d")
        for name in sorted(os.listdir(path)):
            _entry(h, path + b"/" + name, rel + b"/" + name)
        h.update(b"D")


def _xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for name in os.listxattr(path, follow_symlinks=False):
        key = os.fsencode(name)
        for prefix in OVERLAY_PREFIXES:
            if key.startswith(prefix):
                key = b"overlay." + key[len(prefix):]
                fact = key[len(b"overlay."):]
                if fact in LOCAL_FACTS or fact.startswith(OWN_PREFIX):
                    key = b""
                break
        if key:
            out.append((key, os.getxattr(path, name, follow_symlinks=False)))
    return sorted(out)


def chain_identity(conn: sqlite3.Connection, layout: Layout, top: str,
                   owner: tuple[int, int]) -> str:
    """The identity of ``top`` with every layer below it, bottom first.  Each layer's own
    comes from the catalog, else is computed (all missing ones in one child, as root of the
    store's user namespace) and recorded."""
    layers = list(reversed(cat.chain(conn, top)))
    known = {x: str(c)[len(VERSION):] for x, c in conn.execute(
        f"SELECT id, content FROM layers WHERE content LIKE '{VERSION}%' AND id IN "
        f"({','.join('?' * len(layers))})", layers)}
    paths = {x: layout.layer(x) for x in layers if x not in known}
    if paths:
        found = run_as_mapped_root(lambda: {x: tree_identity(p) for x, p in paths.items()},
                                   plan_ids("auto", owner))
        conn.executemany("UPDATE layers SET content=? WHERE id=?",
                         [(VERSION + digest, x) for x, digest in found.items()])
        known.update(found)
    h = hashlib.sha256(b"overlayfuse chain v1\0")
    for layer in layers:
        h.update(known[layer].encode() + b"\0")
    return h.hexdigest()
