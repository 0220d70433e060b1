"""Store layers as OCI layer tarballs: one layer's changes, or a chain's flattened tree.

OCI layers know no renames, no redirects and no metacopy, so what a layer only points at is
written out: a renamed directory (``redirect``) becomes the whole merged directory, opaque,
beside the whiteout its old name already has; a metacopy file gets the data of the lower file
it names.  For that the chain is read as the kernel reads it (:class:`Chain`: whiteouts, opaque
dirs, redirects), one directory fd at a time and never through a symlink.  Whiteouts become
``.wh.NAME``, opaque dirs get ``.wh..wh..opq``; xattrs go out as PAX ``SCHILY.xattr.*``
records (``user.*`` but an overlay's private names, file capabilities and IMA signatures).
Names are bytes on disk and surrogate-escaped text in the archive, so any name survives.
Owners are written as the caller sees them: the store runs this as root of the user's
namespace, so a normal user's subordinate IDs come out as the IDs its runs see.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zlib
from typing import BinaryIO

from .. import format as fmt
from ..errors import OverlayfuseError

OPQ = ".wh..wh..opq"
WH = ".wh."
PRIVATE = ("user.overlay.", "user.fuseoverlayfs.")
DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_RDONLY | os.O_CLOEXEC
CHUNK = 1 << 20


def exported_xattr(name: str) -> bool:
    """The xattrs an image carries: ``user.*`` (not an overlay's bookkeeping), capabilities
    and IMA signatures; never ``trusted.*``, ``security.selinux`` (a host's labels)."""
    if name in ("security.capability", "security.ima"):
        return True
    return name.startswith("user.") and not name.startswith(PRIVATE)


class BlobSink:
    """A file-like end of a tar stream: hashes the tar (the diff ID), gzips it (level 3,
    no name, time 0: the same tree gives the same digest) and hashes and writes the blob."""

    def __init__(self, out: BinaryIO, compress: bool = True) -> None:
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        self._z = zlib.compressobj(3, zlib.DEFLATED, 31) if compress else None

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        self._emit(self._z.compress(data) if self._z is not None else bytes(data))
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.update(data)
            self.size += len(data)
            self.out.write(data)

    def finish(self) -> tuple[str, str, int]:
        """``(diff ID, digest, size)`` once the tar stream is closed."""
        if self._z is not None:
            self._emit(self._z.flush())
        return "sha256:" + self.diff.hexdigest(), "sha256:" + self.blob.hexdigest(), self.size


def _lstat(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class Chain:
    """Layer dirs, topmost first, read as the kernel merges them (read-only, no index)."""

    def __init__(self, roots: list[str], prefix: bytes) -> None:
        self.prefix = prefix
        self.roots: list[int] = []
        try:
            for r in roots:
                self.roots.append(os.open(r, DIR_FLAGS))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.roots:
            os.close(fd)
        self.roots = []

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookup --------------------------------------------------------------------------

    def whiteout(self, dfd: int, name: str, st: os.stat_result) -> bool:
        """The kernel's 0/0 device or its xattr form."""
        if fmt.is_whiteout_stat(st):
            return True
        return fmt.has_xattr_whiteout_shape(st) and \
            fmt.is_xattr_whiteout(dfd, os.fsencode(name), st, self.prefix)

    def root_stack(self, start: int = 0) -> list[tuple[int, int]]:
        """The merged root: every layer's root (fds owned by the caller)."""
        return [(i, os.dup(fd)) for i, fd in enumerate(self.roots) if i >= start]

    def child(self, stack: list[tuple[int, int]], name: str
              ) -> tuple[list[tuple[int, int]], tuple[int, int, os.stat_result] | None]:
        """Below the merged dir ``stack``: the child dir's stack (fds owned by the caller),
        or the topmost non-directory ``(layer, parent fd, stat)``; ([], None) if absent."""
        out: list[tuple[int, int]] = []
        try:
            for li, dfd in stack:
                st = _lstat(dfd, name)
                if st is None:
                    if _lstat(dfd, WH + name) is not None:
                        break
                    continue
                if self.whiteout(dfd, name, st):
                    break
                if not stat.S_ISDIR(st.st_mode):
                    return out, (None if out else (li, dfd, st))
                fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                out.append((li, fd))
                marks = fmt.overlay_xattrs(dfd, os.fsencode(name), self.prefix)
                if fmt.opaque_in(marks) or _lstat(fd, OPQ) is not None:
                    break
                redirect = marks.get(b"redirect")
                if redirect:
                    _check_redirect(redirect, name)
                    if redirect.startswith(b"/"):
                        out += self.stack_at(_split(redirect), li + 1)
                        break
                    name = os.fsdecode(redirect)  # the layers below use the old name
        except BaseException:
            close_stack(out)
            raise
        return out, None

    def stack_at(self, parts: tuple[str, ...], start: int
                 ) -> list[tuple[int, int]]:
        """The merged dir at ``parts`` in the layers from ``start`` down ([] if none)."""
        stack = self.root_stack(start)
        for name in parts:
            nxt, _ = self.child(stack, name)
            close_stack(stack)
            stack = nxt
            if not stack:
                break
        return stack

    def file_at(self, parts: tuple[str, ...], start: int) -> tuple[int, str, os.stat_result]:
        """The non-directory at ``parts`` in the layers from ``start`` down: (an fd of its
        parent owned by the caller, name, stat); what a metacopy file's data is."""
        stack = self.stack_at(parts[:-1], start)
        try:
            _, hit = self.child(stack, parts[-1])
            if hit is None:
                raise FileNotFoundError(f"the data of {'/'.join(parts)} in no lower layer")
            _li, dfd, st = hit
            return os.dup(dfd), parts[-1], st
        finally:
            close_stack(stack)

    def entries(self, stack: list[tuple[int, int]]
                ) -> list[tuple[str, int, int, os.stat_result]]:
        """The merged listing of ``stack``: ``(name, layer, parent fd, stat)`` by name."""
        seen: set[str] = set()
        out: list[tuple[str, int, int, os.stat_result]] = []
        for li, dfd in stack:
            names = os.listdir(dfd)
            hidden = {n[len(WH):] for n in names if n.startswith(WH) and n != OPQ}
            for n in names:
                if n in seen or n.startswith(WH):
                    continue
                seen.add(n)
                st = _lstat(dfd, n)
                if st is not None and not self.whiteout(dfd, n, st):
                    out.append((n, li, dfd, st))
            seen |= hidden
        out.sort(key=lambda e: os.fsencode(e[0]))
        return out


def _check_redirect(redirect: bytes, name: str) -> None:
    """The kernel's rules, so a crafted redirect cannot walk out of the layers: one name,
    or an absolute path without empty, "." or ".." components."""
    parts = redirect[1:].split(b"/") if redirect.startswith(b"/") else [redirect]
    if (not redirect.startswith(b"/") and b"/" in redirect) or not all(parts) or \
            b"." in parts or b".." in parts:
        raise OverlayfuseError(f"the directory {name!r} has a malformed redirect {redirect!r}")


def _split(path: bytes) -> tuple[str, ...]:
    return tuple(os.fsdecode(p) for p in path.split(b"/") if p)


def close_stack(stack: list[tuple[int, int]]) -> None:
    for _, fd in stack:
        os.close(fd)


class TarWriter:
    """Entries into a PAX tar stream, hard links within the stream kept."""

    def __init__(self, sink: BlobSink, chain: Chain) -> None:
        self.chain = chain
        self.tf = tarfile.open(fileobj=sink, mode="w|",  # type: ignore[call-overload]
                               format=tarfile.PAX_FORMAT, encoding="utf-8",
                               errors="surrogateescape")
        self.links: dict[tuple[int, int], str] = {}
        self.entries = 0

    def close(self) -> None:
        self.tf.close()

    def _info(self, parts: tuple[str, ...], st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo("/".join(parts) if parts else ".")
        ti.type = kind
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = st.st_mtime_ns // 10**9
        ns = st.st_mtime_ns % 10**9
        if ns:
            ti.pax_headers["mtime"] = f"{st.st_mtime_ns // 10**9}.{ns:09d}"
        return ti

    def _xattrs(self, ti: tarfile.TarInfo, dfd: int, name: str) -> None:
        path = f"/proc/self/fd/{dfd}/{name}" if name else f"/proc/self/fd/{dfd}"
        follow = not name
        try:
            names = os.listxattr(path, follow_symlinks=follow)
        except OSError:
            return
        for x in sorted(names):
            if not exported_xattr(x):
                continue
            try:
                value = os.getxattr(path, x, follow_symlinks=follow)
            except OSError:
                continue
            ti.pax_headers["SCHILY.xattr." + x] = value.decode("utf-8", "surrogateescape")

    def _add(self, ti: tarfile.TarInfo, data: BinaryIO | None = None) -> None:
        self.tf.addfile(ti, data)
        self.tf.members = []  # a stream: keep memory flat
        self.entries += 1

    def directory(self, parts: tuple[str, ...], dfd: int, name: str,
                  st: os.stat_result) -> None:
        """A directory entry; ``name`` "" with ``dfd`` the dir itself (a layer's root)."""
        ti = self._info(parts, st, tarfile.DIRTYPE)
        self._xattrs(ti, dfd, name)
        if not parts:
            ti.name = "./"
        self._add(ti)

    def marker(self, parts: tuple[str, ...], st: os.stat_result | None = None) -> None:
        """An empty file named as OCI's whiteout or opaque marker."""
        ti = tarfile.TarInfo("/".join(parts))
        ti.mode = 0 if st is None else stat.S_IMODE(st.st_mode)
        ti.uname = ti.gname = ""
        if st is not None:
            ti.mtime = st.st_mtime_ns // 10**9
        self._add(ti)

    def other(self, parts: tuple[str, ...], li: int, dfd: int, name: str,
              st: os.stat_result) -> None:
        """A file, symlink, fifo or device; a metacopy file with its lower data."""
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and key in self.links:
            ti = self._info(parts, st, tarfile.LNKTYPE)
            ti.linkname = self.links[key]
            self._add(ti)
            return
        if stat.S_ISREG(st.st_mode):
            self._regular(parts, li, dfd, name, st)
        else:
            if stat.S_ISLNK(st.st_mode):
                ti = self._info(parts, st, tarfile.SYMTYPE)
                ti.linkname = os.readlink(name, dir_fd=dfd)
            elif stat.S_ISFIFO(st.st_mode):
                ti = self._info(parts, st, tarfile.FIFOTYPE)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                ti = self._info(parts, st, tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode)
                                else tarfile.BLKTYPE)
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            else:
                return  # a socket: nothing an archive can carry
            self._xattrs(ti, dfd, name)
            self._add(ti)
        if st.st_nlink > 1:
            self.links[key] = "/".join(parts)

    def _regular(self, parts: tuple[str, ...], li: int, dfd: int, name: str,
                 st: os.stat_result) -> None:
        ti = self._info(parts, st, tarfile.REGTYPE)
        self._xattrs(ti, dfd, name)
        marks = fmt.overlay_xattrs(dfd, os.fsencode(name), self.chain.prefix)
        src_dfd, src_name = dfd, name
        owned = -1
        if b"metacopy" in marks:
            redirect = marks.get(b"redirect")
            if redirect:
                _check_redirect(redirect, name)
            where = _split(redirect) if redirect and redirect.startswith(b"/") else parts
            while True:
                owned, src_name, _st = self.chain.file_at(where, li + 1)
                src_dfd = owned
                lmarks = fmt.overlay_xattrs(owned, os.fsencode(src_name), self.chain.prefix)
                if b"metacopy" not in lmarks:
                    break
                os.close(owned)
                li += 1  # a metacopy over a metacopy: keep going down
        try:
            fd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dfd)
        finally:
            if owned >= 0:
                os.close(owned)
        with os.fdopen(fd, "rb", buffering=CHUNK) as f:
            ti.size = os.fstat(fd).st_size if owned >= 0 else st.st_size
            self._add(ti, f)


def write_layer(writer: TarWriter) -> None:
    """The changes of the chain's top layer as an OCI layer: its root, then every entry."""
    top = writer.chain.roots[0]
    writer.directory((), top, "", os.fstat(top))
    _diff(writer, (), os.dup(top))


def _diff(w: TarWriter, parts: tuple[str, ...], dfd: int) -> None:
    """The top layer's dir ``parts`` (``dfd``, closed here) as OCI entries."""
    try:
        for name in sorted(os.listdir(dfd), key=os.fsencode):
            st = _lstat(dfd, name)
            if st is None:
                continue
            path = parts + (name,)
            if w.chain.whiteout(dfd, name, st):
                w.marker(parts + (WH + name,))
            elif name.startswith(WH):
                w.marker(path, st)  # already in the OCI form (a layer made from one)
            elif stat.S_ISDIR(st.st_mode):
                marks = fmt.overlay_xattrs(dfd, os.fsencode(name), w.chain.prefix)
                w.directory(path, dfd, name, st)
                if marks.get(b"redirect"):
                    # renamed: the old name's whiteout is in the layer; write it all here
                    w.marker(path + (OPQ,))
                    stack = w.chain.stack_at(path, 0)
                    _whole(w, path, stack)
                    continue
                if fmt.opaque_in(marks):
                    w.marker(path + (OPQ,))
                _diff(w, path, os.open(name, DIR_FLAGS, dir_fd=dfd))
            else:
                w.other(path, 0, dfd, name, st)
    finally:
        os.close(dfd)


def _whole(w: TarWriter, parts: tuple[str, ...], stack: list[tuple[int, int]]) -> None:
    """Everything the merged dir ``stack`` (closed here) shows, recursively."""
    try:
        for name, li, dfd, st in w.chain.entries(stack):
            path = parts + (name,)
            if stat.S_ISDIR(st.st_mode):
                w.directory(path, dfd, name, st)
                sub, _ = w.chain.child(stack, name)
                _whole(w, path, sub)
            else:
                w.other(path, li, dfd, name, st)
    finally:
        close_stack(stack)


def write_flat(writer: TarWriter) -> None:
    """The chain's merged tree as one plain archive (``podman export``'s form)."""
    stack = writer.chain.root_stack()
    writer.directory((), stack[0][1], "", os.fstat(stack[0][1]))
    _whole(writer, (), stack)


def layer_blob(roots: list[str], prefix: bytes, out_fd: int) -> tuple[str, str, int, int]:
    """Write the top of ``roots`` (topmost first) as a gzipped layer blob to ``out_fd`` (left
    open): ``(diff ID, digest, size, entries)``."""
    with Chain(roots, prefix) as chain, open(out_fd, "wb", closefd=False) as out:
        sink = BlobSink(out)
        w = TarWriter(sink, chain)
        write_layer(w)
        w.close()
        diff_id, digest, size = sink.finish()
    return diff_id, digest, size, w.entries


def flat_tar(roots: list[str], prefix: bytes, out_fd: int) -> int:
    """The merged tree of ``roots`` as a plain tar to ``out_fd`` (left open): how many
    entries."""
    with Chain(roots, prefix) as chain, open(out_fd, "wb", closefd=False) as out:
        sink = BlobSink(out, compress=False)
        w = TarWriter(sink, chain)
        write_flat(w)
        w.close()
    return w.entries
