"""A build's ``COPY``: what the key hashes, and the copy into the tree.

The key covers what lands in the tree: each source's names, types, permission bits, file
contents and link targets, and the owner every copied entry gets (root of the tree, as a
Containerfile's ``COPY`` without ``--chown``); never mtimes, so a ``touch`` does not invalidate
(the copies keep the sources' mtimes all the same).  Only regular files, directories and
symbolic links can be copied; a directory source copies its contents into ``DST``.

The copy runs in the step's sandbox before its root is entered (``run_rooted``'s ``inside``),
as root of the tree's user namespace, with the tree mounted: ``DST`` is resolved inside the
tree (``resolve_in``: symlinks followed as if the tree were ``/``, its own last one included,
as a Containerfile's ``COPY`` does; missing components made), and below it nothing in the tree
is followed: an entry in the way (a symlink too) is replaced unless both are directories.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
from typing import Sequence

from ..errors import OverlayfuseError
from ..sandbox.rootfs import resolve_in

COPIED_OWNER = (0, 0)


def copy_digest(sources: Sequence[str], dest: str, where: str) -> str:
    """sha256 of what ``COPY sources dest`` puts into the tree (see the module's docstring);
    OverlayfuseError naming ``where`` for a source that cannot be copied."""
    h = hashlib.sha256()
    h.update(f"COPY\0{dest}\0{COPIED_OWNER[0]}:{COPIED_OWNER[1]}\0".encode())
    for src in sources:
        h.update(b"S" + os.fsencode(os.path.basename(src)) + b"\0")
        _digest_entry(h, src, b".", where)
    return h.hexdigest()


def _digest_entry(h: "hashlib._Hash", path: str, rel: bytes, where: str) -> None:
    try:
        st = os.lstat(path)
        h.update(b"%s\0%o\0" % (rel, stat.S_IMODE(st.st_mode)))
        if stat.S_ISREG(st.st_mode):
            h.update(b"f%d\0" % st.st_size)
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        elif stat.S_ISLNK(st.st_mode):
            h.update(b"l" + os.fsencode(os.readlink(path)) + b"\0")
        elif stat.S_ISDIR(st.st_mode):
            h.update(b"d")
            for name in sorted(os.listdir(os.fsencode(path))):
                _digest_entry(h, os.path.join(path, os.fsdecode(name)), rel + b"/" + name,
                              where)
            h.update(b"D")
        else:
            raise OverlayfuseError(f"{where}: COPY source {path}: only files, directories and "
                                   "symbolic links can be copied")
    except OSError as e:
        raise OverlayfuseError(f"{where}: COPY source {e.filename or path}: "
                               f"{e.strerror}") from None


def copy_step(root: str, sources: Sequence[str], dest: str) -> None:
    """A COPY step in its sandbox: ``copy_into``, and a failure ends the step like a failed
    command (one line, exit status 1), so the build keeps its partial result."""
    try:
        copy_into(root, sources, dest)
    except (OSError, OverlayfuseError) as e:
        if isinstance(e, OSError):
            where = os.fsdecode(e.filename or "")
            where = "/" + os.path.relpath(where, root) if where.startswith(root) else where
            e = OverlayfuseError(f"{where}: {e.strerror}")
        print(f"overlayfuse build: COPY to {dest}: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def copy_into(root: str, sources: Sequence[str], dest: str) -> None:
    """Copy ``sources`` into the tree mounted at ``root``: a directory's contents into
    ``dest``; a file to ``dest``, or into it when it ends in ``/`` or is a directory."""
    for src in sources:
        if os.path.isdir(src):
            target = _make_dirs(root, dest)
            for name in sorted(os.listdir(src)):
                _copy_entry(os.path.join(src, name), os.path.join(target, name))
            continue
        if dest.endswith("/") or os.path.isdir(resolve_in(root, dest)):
            _make_dirs(root, dest)
            target = resolve_in(root, dest.rstrip("/") + "/" + os.path.basename(src))
        else:
            _make_dirs(root, os.path.dirname(dest))
            target = resolve_in(root, dest)
        _copy_entry(src, target)


def _make_dirs(root: str, path: str) -> str:
    """The host path of ``path`` in the tree, made (0755, root's) where it is missing."""
    done = ""
    for name in [p for p in path.split("/") if p not in ("", ".")]:
        done += "/" + name
        here = resolve_in(root, done)
        if not os.path.lexists(here):
            # a symlink may point at a path missing in the tree: its missing components are
            # made too (no symlink among them: resolve_in followed every one that exists)
            missing = []
            while not os.path.lexists(here):
                missing.append(here)
                here = os.path.dirname(here)
            for d in reversed(missing):
                os.mkdir(d, 0o755)
                os.chmod(d, 0o755)
        elif not os.path.isdir(here):
            raise OverlayfuseError(f"COPY destination {path}: {done} is not a directory in "
                                   "the tree")
    return resolve_in(root, path)


def _copy_children(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        _copy_entry(os.path.join(src, name), os.path.join(dst, name))
    st = os.lstat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_entry(src: str, dst: str) -> None:
    """``src`` to ``dst``, never following what is at ``dst`` (it is replaced unless both are
    directories, which merge)."""
    st = os.lstat(src)
    try:
        old = os.lstat(dst)
    except FileNotFoundError:
        old = None
    if old is not None and not (stat.S_ISDIR(old.st_mode) and stat.S_ISDIR(st.st_mode)):
        if stat.S_ISDIR(old.st_mode):
            raise OverlayfuseError(f"COPY: {src} would replace the directory {dst}")
        os.unlink(dst)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        if old is None:
            os.mkdir(dst, 0o700)
        _copy_children(src, dst)
        os.chmod(dst, mode)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    else:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with open(src, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
