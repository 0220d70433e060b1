"""Apply an OCI layer blob as a store layer: the overlay format, digests checked as it streams.

``.wh.NAME`` becomes the kernel's whiteout (a 0/0 device; where mknod is refused its xattr
form), ``.wh..wh..opq`` an ``opaque`` mark, and a ``.wh.D`` with entries under ``D`` in the same
layer an opaque ``D``: what the image shows is what the layer shows over the same lowers.
``tarfile`` neither applies xattrs nor makes devices, so this applier is our own; the blob is
untrusted: every path is walked from the layer's root one dir fd at a time with O_NOFOLLOW,
and an entry naming ``..`` or an absolute path, going through a symlink, or a hard link to
anything but an earlier file of the same layer refuses the whole layer.  Xattrs: ``user.*``,
``security.capability`` and ``security.ima``, never ``trusted.*``, an overlay's names or
``security.selinux``.  The blob's digest and the tar's diff ID are compared at its end, and the
caller drops the layer when they differ.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from .. import format as fmt
from ..errors import OverlayfuseError
from .ocitar import DIR_FLAGS, OPQ, PRIVATE, WH
from .tarimport import open_dir_beneath

CHUNK = 1 << 20
# layer media types we can read, and whether they are gzipped
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": False,
    "application/vnd.oci.image.layer.v1.tar+gzip": True,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": True,
}


def imported_xattr(name: str) -> bool:
    """What an image may set: ``user.*`` (not an overlay's names), capabilities, IMA."""
    if name.startswith("trusted.") or name.startswith(PRIVATE) or name == "security.selinux":
        return False
    return name.startswith("user.") or name in ("security.capability", "security.ima")


@dataclass
class ApplySummary:
    """What applying a layer did, for its summary line."""

    entries: int = 0
    data_bytes: int = 0
    whiteouts: int = 0
    devices_skipped: int = 0
    unmapped: int = 0
    xattrs_dropped: int = 0
    xattrs_failed: list[str] = field(default_factory=list)

    def notes(self, what: str) -> list[str]:
        out = []
        if self.devices_skipped:
            out.append(f"{what}: skipped {self.devices_skipped} device nodes (mknod refused, "
                       "or a 0/0 device, which is a whiteout in a layer)")
        if self.unmapped:
            out.append(f"{what}: {self.unmapped} entries owned by IDs beyond the map kept ID 0")
        if self.xattrs_dropped:
            out.append(f"{what}: dropped {self.xattrs_dropped} xattrs outside user.*, "
                       "security.capability and security.ima")
        if self.xattrs_failed:
            out.append(f"{what}: {len(self.xattrs_failed)} xattrs could not be set (first: "
                       f"{self.xattrs_failed[0]})")
        return out


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


class _Gunzip:
    """gzip members, one after another, as a reader."""

    def __init__(self, src: _Hashing) -> None:
        self.src = src
        self.z = zlib.decompressobj(31)
        self.buf = b""
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buf) < n):
            raw = self.src.read(CHUNK)
            if not raw:
                if not self.z.eof:
                    raise OverlayfuseError("the gzip stream ends early")
                self.eof = True
                break
            self.buf += self.z.decompress(raw)
            while self.z.eof and self.z.unused_data:
                rest = self.z.unused_data
                self.z = zlib.decompressobj(31)
                self.buf += self.z.decompress(rest)
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _parts(name: str) -> tuple[str, ...]:
    if name.startswith("/"):
        raise _refuse(name, "is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(name, "names '..' (it would land outside the tree)")
    return parts


def _refuse(name: str, why: str) -> OverlayfuseError:
    return OverlayfuseError(f"refusing the layer: entry {name!r} {why}")


def _ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text:
        sec, _, frac = text.partition(".")
        try:
            sign = -1 if sec.startswith("-") else 1
            return int(sec) * 10**9 + sign * int((frac + "000000000")[:9] or 0)
        except ValueError:
            pass
    return int(round(m.mtime * 10**9))


class Applier:
    """OCI entries into a fresh layer dir, in the overlay format of ``prefix``."""

    def __init__(self, layer: str, prefix: bytes, chown: bool) -> None:
        self.prefix = prefix
        self.chown = chown
        self.root = os.open(layer, DIR_FLAGS)
        self.summary = ApplySummary()
        self.made: dict[tuple[str, ...], str] = {}      # "dir", "file" or "wh"
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo | None] = {(): None}

    def close(self) -> None:
        os.close(self.root)

    def _walk(self, parts: tuple[str, ...], name: str) -> int:
        """A new fd of dir ``parts``, made (as tar makes parents) where missing; a whiteout of
        this layer in the way becomes an opaque dir, as ``.wh.D`` plus ``D/x`` means."""
        def whiteout_to_opaque(fd: int, here: tuple[str, ...]) -> None:
            if self.made.get(here) == "wh":
                os.unlink(here[-1], dir_fd=fd)
                os.mkdir(here[-1], 0o700, dir_fd=fd)
                self._mark_opaque(fd, here[-1])
                self.made[here] = "dir"
                self.dirs.setdefault(here, None)
        fd, made = open_dir_beneath(self.root, parts, True, lambda where: _refuse(
            name, f"goes through {where!r}, which is not a directory (a symlink?)"),
            whiteout_to_opaque)
        for here in made:
            self.made[here] = "dir"
            self.dirs.setdefault(here, None)
        return fd

    def _mark_opaque(self, dfd: int, name: str) -> None:
        fmt.set_overlay_xattr(dfd, os.fsencode(name), self.prefix, b"opaque", b"y")

    def _clear(self, dfd: int, parts: tuple[str, ...], name: str) -> None:
        """Room for a non-directory: a later entry replaces an earlier one, as tar does."""
        kind = self.made.pop(parts, None)
        if kind == "dir":
            raise _refuse(name, "would replace a directory of the same layer")
        if kind is not None:
            os.unlink(parts[-1], dir_fd=dfd)

    def add(self, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = _parts(m.name)
        self.summary.entries += 1
        if not parts:
            if not m.isdir():
                raise _refuse(m.name, "is the tree's root but not a directory")
            self.dirs[()] = m
            return
        leaf = parts[-1]
        dfd = self._walk(parts[:-1], m.name)
        try:
            if leaf == OPQ:
                if parts[:-1]:
                    fmt.set_overlay_xattr(dfd, b"", self.prefix, b"opaque", b"y")
                return
            if leaf.startswith(WH):
                self._whiteout(dfd, parts[:-1] + (leaf[len(WH):],), m.name)
                return
            self._entry(m, tf, dfd, parts)
        finally:
            os.close(dfd)

    def _whiteout(self, dfd: int, parts: tuple[str, ...], name: str) -> None:
        if not parts[-1] or parts[-1] in (".", ".."):
            raise _refuse(name, "is a whiteout of no name")
        kind = self.made.get(parts)
        if kind == "dir":
            self._mark_opaque(dfd, parts[-1])  # the layer's own D over a hidden lower D
            return
        if kind is not None:
            return  # a whiteout hides lower layers only
        self.summary.whiteouts += 1
        root = self.root

        def announce() -> None:
            fmt.add_features(root, self.prefix, {fmt.XWHITEOUT}, durable=False)
        if fmt.make_whiteout(dfd, os.fsencode(parts[-1]), self.prefix, announce):
            fmt.mark_xattr_whiteouts(dfd, self.prefix)
        self.made[parts] = "wh"

    def _entry(self, m: tarfile.TarInfo, tf: tarfile.TarFile, dfd: int,
               parts: tuple[str, ...]) -> None:
        leaf = parts[-1]
        if m.isdir():
            kind = self.made.get(parts)
            if kind == "wh":
                os.unlink(leaf, dir_fd=dfd)
                os.mkdir(leaf, 0o700, dir_fd=dfd)
                self._mark_opaque(dfd, leaf)
            elif kind == "file":
                os.unlink(leaf, dir_fd=dfd)
                os.mkdir(leaf, 0o700, dir_fd=dfd)
            elif kind is None:
                os.mkdir(leaf, 0o700, dir_fd=dfd)
            self.made[parts] = "dir"
            self.dirs[parts] = m
            return
        if m.islnk():
            target = _parts(m.linkname)
            if self.made.get(target) != "file" or target == parts:
                raise _refuse(m.name, f"is a hard link to {m.linkname!r}, which is not an "
                                      "earlier file of the layer")
            self._clear(dfd, parts, m.name)
            tfd = self._walk(target[:-1], m.name)
            try:
                os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=dfd,
                        follow_symlinks=False)
            finally:
                os.close(tfd)
            self.made[parts] = "file"
            return
        if m.ischr() or m.isblk():
            if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                self.summary.devices_skipped += 1
                return
        elif not (m.isreg() or m.issym() or m.isfifo()):
            raise _refuse(m.name, f"has the unknown type {m.type!r}")
        self._clear(dfd, parts, m.name)
        if m.isreg():
            self._file(m, tf, dfd, leaf)
        elif m.issym():
            os.symlink(m.linkname, leaf, dir_fd=dfd)
            self._own(f"/proc/self/fd/{dfd}/{leaf}", m, symlink=True)
        else:
            try:
                if m.isfifo():
                    os.mkfifo(leaf, 0o600, dir_fd=dfd)
                else:
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                    os.mknod(leaf, kind | 0o600, os.makedev(m.devmajor, m.devminor),
                             dir_fd=dfd)
            except PermissionError:
                self.summary.devices_skipped += 1  # mknod, in a user namespace
                return
            self._own(f"/proc/self/fd/{dfd}/{leaf}", m)
        self.made[parts] = "file"

    def _file(self, m: tarfile.TarInfo, tf: tarfile.TarFile, dfd: int, leaf: str) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            if src is not None:
                while chunk := src.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self.summary.data_bytes += m.size
            self._own(fd, m)
        finally:
            os.close(fd)

    def _own(self, target: int | str, m: tarfile.TarInfo, symlink: bool = False) -> None:
        """Owner, then mode (chown drops set-ID bits), then xattrs (chown drops file
        capabilities), then times."""
        follow = isinstance(target, int)
        if self.chown:
            try:
                os.chown(target, m.uid, m.gid, follow_symlinks=follow)
            except OSError as e:
                if e.errno != errno.EINVAL:  # an ID the namespace does not map
                    raise
                self.summary.unmapped += 1
        if not symlink:
            os.chmod(target, m.mode & 0o7777, follow_symlinks=follow)
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if not imported_xattr(name):
                self.summary.xattrs_dropped += 1
                continue
            try:
                os.setxattr(target, name, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=follow)
            except OSError as e:
                self.summary.xattrs_failed.append(f"{name} on {m.name}: {e.strerror}")
        mtime = _ns(m)
        os.utime(target, ns=(mtime, mtime), follow_symlinks=follow)

    def finish(self) -> None:
        """Directories last, deepest first: their entries change their mtimes, and a mode
        may deny the writes that made them."""
        for parts in sorted(self.dirs, key=len, reverse=True):
            m = self.dirs[parts]
            if m is None:
                if parts:
                    os.chmod(f"/proc/self/fd/{self.root}/" + "/".join(parts), 0o755,
                             follow_symlinks=False)
                continue
            fd = self._walk(parts, m.name)
            try:
                self._own(fd, m)
            finally:
                os.close(fd)


def apply_blob(blob: str, media_type: str, digest: str, diff_id: str, layer: str,
               prefix: bytes, chown: bool) -> ApplySummary:
    """Unpack the layer blob at ``blob`` into the empty dir ``layer``; a digest or diff ID
    that does not match (or a broken stream) raises, and the caller drops the layer."""
    if media_type not in LAYER_TYPES:
        raise OverlayfuseError(f"layer {digest}: unsupported media type {media_type}")
    with open(blob, "rb") as f:
        raw = _Hashing(f)
        diff = _Hashing(_Gunzip(raw) if LAYER_TYPES[media_type] else raw)  # type: ignore[arg-type]
        ap = Applier(layer, prefix, chown)
        try:
            try:
                tf = tarfile.open(fileobj=diff, mode="r|",  # type: ignore[call-overload]
                                  encoding="utf-8", errors="surrogateescape")
                while (m := tf.next()) is not None:
                    tf.members = []
                    ap.add(m, tf)
                ap.finish()
                while diff.read(CHUNK):
                    pass  # the zero blocks after the end: part of the diff ID
                while raw.read(CHUNK):
                    pass
            except (tarfile.TarError, EOFError, zlib.error) as e:
                raise OverlayfuseError(f"layer {digest}: not a readable tar stream ({e})"
                                       ) from None
        finally:
            ap.close()
    if "sha256:" + raw.hash.hexdigest() != digest:
        raise OverlayfuseError(f"layer blob {digest} does not match its digest (it is "
                               f"sha256:{raw.hash.hexdigest()}): corrupt or tampered")
    if "sha256:" + diff.hash.hexdigest() != diff_id:
        raise OverlayfuseError(f"layer {digest}: its content does not match the diff ID "
                               f"{diff_id} of the image's config")
    return ap.summary
