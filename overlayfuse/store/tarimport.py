"""Unpack a root filesystem tarball into a fresh layer, as ``init --from DIR`` copies a tree.

Plain, gzip, bzip2 and xz through ``tarfile``; zstd through the ``zstd`` command.  Owners are
taken by number (a root's IDs, as ``tar --numeric-owner``), with modes (setuid/setgid
included), times, hard links, symlinks, fifos and the xattrs a root needs (``user.*`` and
``security.capability``; never ``trusted.*`` nor an overlay's private names).  Device nodes
are skipped: a user namespace cannot make them, a run's /dev is its own, and a 0/0 character
device would be a whiteout in a layer.

The archive is untrusted: every path is walked from the layer's root one directory fd at a
time with O_NOFOLLOW, so nothing is ever written through a symlink; an entry naming ``..``,
an absolute path, a path through a symlink, a hard link to anything but an earlier entry, or
an OCI whiteout (``.wh.*``) refuses the whole import.  The caller unpacks into a temporary
entry and removes it on failure.
"""
from __future__ import annotations

import base64
import binascii
import errno
import os
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import OverlayfuseError
from ..format import WH_PREFIX
from .progress import Progress

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XATTR_PAX = "SCHILY.xattr."
XATTR_LIBARCHIVE = "LIBARCHIVE.xattr."
PRIVATE_XATTRS = ("user.overlay.", "user.fuseoverlayfs.")
DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_RDONLY | os.O_CLOEXEC
CHUNK = 1 << 20


@dataclass
class TarSummary:
    """What an import did, for its one summary line."""

    entries: int = 0
    data_bytes: int = 0
    devices: int = 0
    other: int = 0               # entry types with nothing to unpack (volume labels ...)
    unmapped: int = 0            # owners beyond the ID map: left to ID 0
    xattrs_dropped: int = 0      # trusted.*, overlay-private and other namespaces
    xattrs_failed: list[str] = field(default_factory=list)

    def line(self, path: str) -> str:
        parts = [f"imported {self.entries} entr{'ies' if self.entries != 1 else 'y'}, "
                 f"{self.data_bytes / (1 << 20):.1f} MiB "
                 f"from {path}"]
        if self.devices:
            parts.append(f"skipped {self.devices} device node{'s' * (self.devices != 1)} "
                         "(the run's /dev is its own)")
        if self.other:
            parts.append(f"skipped {self.other} entries of other types")
        if self.unmapped:
            parts.append(f"{self.unmapped} entries owned by IDs beyond the map kept ID 0")
        if self.xattrs_dropped:
            parts.append(f"dropped {self.xattrs_dropped} xattrs outside user.* and "
                         "security.capability")
        if self.xattrs_failed:
            parts.append(f"{len(self.xattrs_failed)} xattrs could not be set (first: "
                         f"{self.xattrs_failed[0]})")
        return "; ".join(parts)


def _refuse(name: str, why: str) -> OverlayfuseError:
    return OverlayfuseError(f"refusing the archive: entry {name!r} {why}; nothing imported")


def open_dir_beneath(root: int, parts: tuple[str, ...], make: bool,
                     refuse: Callable[[str], OverlayfuseError],
                     before: Callable[[int, tuple[str, ...]], None] | None = None
                     ) -> tuple[int, list[tuple[str, ...]]]:
    """A new fd of the directory ``parts`` below the dir fd ``root``, each component opened
    with ``O_NOFOLLOW`` (never reached through a symlink), and the dirs it made: missing ones
    are made (0700, as tar makes parents) when ``make``.  ``before(fd, here)`` runs in the
    parent before each component is opened; ``refuse(path)`` is raised for a component that
    is no directory."""
    made: list[tuple[str, ...]] = []
    fd = os.dup(root)
    try:
        for i, comp in enumerate(parts):
            here = parts[:i + 1]
            if before is not None:
                before(fd, here)
            try:
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    raise
                os.mkdir(comp, 0o700, dir_fd=fd)
                made.append(here)
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise refuse("/".join(here)) from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, made


def entry_parts(name: str) -> tuple[str, ...]:
    """The components of an entry's name below the root; refused when it could land outside
    (absolute, ``..``) or is a whiteout of the overlay/OCI layer format."""
    if name.startswith("/"):
        raise _refuse(name, "is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _refuse(name, "names '..' (it would land outside the tree)")
    if any(p.encode(errors="surrogateescape").startswith(WH_PREFIX) for p in parts):
        raise _refuse(name, "is a whiteout (.wh.*): an OCI layer, not a root filesystem")
    return parts


def open_archive(path: str) -> tuple[tarfile.TarFile, subprocess.Popen[bytes] | None]:
    """The archive as a stream of members; zstd through the ``zstd`` command."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise OverlayfuseError(f"cannot read {path}: {e.strerror}") from None
    if magic == ZSTD_MAGIC:
        zstd = shutil.which("zstd")
        if zstd is None:
            raise OverlayfuseError(f"{path} is zstd-compressed and the zstd command is missing "
                                   "(Debian's package zstd has it)")
        proc = subprocess.Popen([zstd, "-dcq", "--", path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            return tarfile.open(fileobj=proc.stdout, mode="r|"), proc
        except (tarfile.TarError, EOFError, OSError):
            _finish_zstd(proc, path)
            raise OverlayfuseError(f"{path}: not a tar archive inside the zstd stream") from None
    try:
        return tarfile.open(path, mode="r|*"), None
    except (tarfile.TarError, EOFError, OSError):
        raise OverlayfuseError(f"{path}: not a tar archive (plain, gzip, bzip2, xz or zstd)"
                               ) from None


def _finish_zstd(proc: subprocess.Popen[bytes], path: str) -> None:
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.wait() != 0 and err:
        raise OverlayfuseError(f"zstd cannot read {path}: {err.splitlines()[-1]}")


def import_tar(path: str, layer: str, progress: Progress, chown: bool) -> TarSummary:
    """Unpack the archive ``path`` into the existing empty dir ``layer``.

    ``chown``: give entries their archive's IDs (root, or root of a user namespace with
    subordinate ranges: an ID beyond the map keeps 0); without, every entry stays the
    caller's (a one-ID namespace).  On any error the layer's contents are removed.
    """
    import lzma
    import zlib
    tf, proc = open_archive(path)
    try:
        with _Unpacker(layer, chown) as up:
            try:
                while (member := tf.next()) is not None:
                    tf.members = []  # a stream: nothing looks back, keep memory flat
                    up.add(member, tf)
                    progress.update(f"{up.summary.entries} entries, "
                                    f"{up.summary.data_bytes >> 20} MiB")
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
                raise OverlayfuseError(f"{path}: a broken archive ({e}); nothing imported"
                                       ) from None
            up.finish()
        if proc is not None:
            _finish_zstd(proc, path)
        return up.summary
    except OSError as e:
        _empty(layer)
        name = f" {e.filename}:" if e.filename else ""
        raise OverlayfuseError(f"cannot unpack {path}:{name} {e.strerror or e}; nothing "
                               "imported") from None
    except BaseException:
        _empty(layer)
        raise
    finally:
        tf.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        progress.done()


def _empty(layer: str) -> None:
    """Remove what was unpacked (the caller removes the dir itself)."""
    from ..probe import rmtree_force
    for name in os.listdir(layer):
        p = os.path.join(layer, name)
        if os.path.isdir(p) and not os.path.islink(p):
            rmtree_force(p)
        else:
            os.unlink(p)


def _ns(m: tarfile.TarInfo, key: str, default: float) -> int:
    """A time in ns, exact from the PAX text when there is one (a float loses the ns)."""
    text = m.pax_headers.get(key)
    if text:
        sec, _, frac = text.partition(".")
        try:
            sign = -1 if sec.startswith("-") else 1
            return int(sec) * 10**9 + sign * int((frac + "000000000")[:9] or 0)
        except ValueError:
            pass
    return int(round(default * 10**9))


def _xattrs_of(m: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    """The xattrs of an entry: GNU tar's and star's ``SCHILY.xattr.*``, bsdtar's
    ``LIBARCHIVE.xattr.*`` (name URL-encoded, value base64)."""
    for key, value in m.pax_headers.items():
        if key.startswith(XATTR_PAX):
            yield key[len(XATTR_PAX):], value.encode("utf-8", "surrogateescape")
        elif key.startswith(XATTR_LIBARCHIVE):
            try:
                yield (urllib.parse.unquote(key[len(XATTR_LIBARCHIVE):]),
                       base64.b64decode(value + "=" * (-len(value) % 4)))
            except (ValueError, binascii.Error):
                continue


def wanted_xattr(name: str) -> bool:
    """``user.*`` but an overlay's private names, and file capabilities; never trusted.*."""
    if name == "security.capability":
        return True
    return name.startswith("user.") and not name.startswith(PRIVATE_XATTRS)


@dataclass
class _Dir:
    """A directory's attributes, set after its contents (times, a mode that denies writes)."""

    mode: int = 0o755
    times: tuple[int, int] | None = None
    member: tarfile.TarInfo | None = None


class _Unpacker:
    """Entry by entry into ``layer``, each path walked with dir fds and O_NOFOLLOW."""

    def __init__(self, layer: str, chown: bool) -> None:
        self.chown = chown
        self.root = os.open(layer, DIR_FLAGS)
        self.summary = TarSummary()
        self.dirs: dict[tuple[str, ...], _Dir] = {}
        self.files: set[tuple[str, ...]] = set()           # non-directories made here
        self.skipped: dict[tuple[str, ...], str] = {}      # not made: "device" or "other"
        self._cached: tuple[tuple[str, ...], int] | None = None

    def __enter__(self) -> "_Unpacker":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None
        os.close(self.root)

    # -- paths -------------------------------------------------------------------------------

    def _walk(self, parts: tuple[str, ...], name: str, make: bool) -> int:
        """A new fd of the directory ``parts``, never reached through a symlink; missing
        parents are made when ``make`` (as tar makes them)."""
        fd, made = open_dir_beneath(self.root, parts, make, lambda where: _refuse(
            name, f"goes through {where!r}, which is not a directory (a symlink?)"))
        for here in made:
            self.dirs.setdefault(here, _Dir())
        return fd

    def _parent(self, parts: tuple[str, ...], name: str) -> int:
        """``_walk`` for the parent of consecutive entries, kept open (not the caller's to
        close): directories are never removed or replaced during an import."""
        if self._cached is not None and self._cached[0] == parts:
            return self._cached[1]
        fd = self._walk(parts, name, make=True)
        if self._cached is not None:
            os.close(self._cached[1])
        self._cached = (parts, fd)
        return fd

    def _clear(self, dfd: int, parts: tuple[str, ...], name: str, new_dir: bool) -> bool:
        """Make room for an entry (a later entry replaces an earlier non-directory, as tar
        does); True when a directory is there and the new entry is one too."""
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if new_dir:
                return True
            raise _refuse(name, "would replace a directory")
        os.unlink(parts[-1], dir_fd=dfd)
        self.files.discard(parts)
        return False

    # -- entries -----------------------------------------------------------------------------

    def add(self, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        """One archive member."""
        parts = entry_parts(m.name)
        self.summary.entries += 1
        if m.ischr() or m.isblk():
            self.summary.devices += 1  # a 0/0 char device (a whiteout) among them: never made
            self.skipped[parts] = "device"
            return
        if not (m.isdir() or m.isreg() or m.issym() or m.islnk() or m.isfifo()):
            self.summary.other += 1
            self.skipped[parts] = "other"
            return
        if not parts:
            if not m.isdir():
                raise _refuse(m.name, "is the tree's root but not a directory")
            self._record_dir((), m)
            return
        dfd = self._parent(parts[:-1], m.name)
        if m.islnk():
            self._link(m, parts, dfd)
            return
        if self._clear(dfd, parts, m.name, m.isdir()):
            self._record_dir(parts, m)
            return
        leaf = parts[-1]
        if m.isdir():
            os.mkdir(leaf, 0o700, dir_fd=dfd)
            self._record_dir(parts, m)
            return
        if m.isreg():
            self._file(m, tf, dfd, leaf)
        elif m.issym():
            os.symlink(m.linkname, leaf, dir_fd=dfd)
            self._chown(leaf, m, dir_fd=dfd, follow_symlinks=False)
            os.utime(leaf, ns=self._times(m), dir_fd=dfd, follow_symlinks=False)
        else:
            os.mkfifo(leaf, 0o600, dir_fd=dfd)
            self._chown(leaf, m, dir_fd=dfd, follow_symlinks=False)
            os.chmod(leaf, m.mode & 0o7777, dir_fd=dfd, follow_symlinks=False)
            self._xattrs(f"/proc/self/fd/{dfd}/{leaf}", m)
            os.utime(leaf, ns=self._times(m), dir_fd=dfd, follow_symlinks=False)
        self.files.add(parts)

    def _file(self, m: tarfile.TarInfo, tf: tarfile.TarFile, dfd: int, leaf: str) -> None:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            if src is not None:
                while chunk := src.read(CHUNK):
                    _write_all(fd, chunk)
            self.summary.data_bytes += m.size
            self._chown(fd, m)
            os.fchmod(fd, m.mode & 0o7777)  # after chown, which drops setuid/setgid
            self._xattrs(fd, m)             # after chown, which drops security.capability
            os.utime(fd, ns=self._times(m))
        finally:
            os.close(fd)

    def _link(self, m: tarfile.TarInfo, parts: tuple[str, ...], dfd: int) -> None:
        try:
            target = entry_parts(m.linkname)
        except OverlayfuseError:
            raise _refuse(m.name, f"is a hard link to {m.linkname!r}, outside the tree"
                          ) from None
        if target in self.skipped:
            kind = self.skipped[target]
            self.skipped[parts] = kind
            if kind == "device":
                self.summary.devices += 1
            else:
                self.summary.other += 1
            return
        if target not in self.files or target == parts:
            raise _refuse(m.name, f"is a hard link to {m.linkname!r}, which is not an "
                                  "earlier file of the archive")
        self._clear(dfd, parts, m.name, False)
        tfd = self._walk(target[:-1], m.name, make=False)
        try:
            os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=dfd,
                    follow_symlinks=False)
        finally:
            os.close(tfd)
        self.files.add(parts)

    # -- attributes --------------------------------------------------------------------------

    def _times(self, m: tarfile.TarInfo) -> tuple[int, int]:
        mtime = _ns(m, "mtime", m.mtime)
        return _ns(m, "atime", mtime / 10**9), mtime

    def _chown(self, target: int | str, m: tarfile.TarInfo, **kw: object) -> None:
        if not self.chown:
            return
        try:
            os.chown(target, m.uid, m.gid, **kw)  # type: ignore[arg-type]
        except OSError as e:
            if e.errno != errno.EINVAL:  # an ID the namespace does not map
                raise
            self.summary.unmapped += 1

    def _xattrs(self, target: int | str, m: tarfile.TarInfo) -> None:
        for name, value in _xattrs_of(m):
            if not wanted_xattr(name):
                self.summary.xattrs_dropped += 1
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                self.summary.xattrs_failed.append(f"{name} on {m.name}: {e.strerror}")

    def _record_dir(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        self.dirs[parts] = _Dir(m.mode & 0o7777, self._times(m), m)

    def finish(self) -> None:
        """The directories' owners, modes, xattrs and times, deepest first: making an entry
        changes its parent's mtime, and a mode may deny the writes that made the contents."""
        for parts in sorted(self.dirs, key=len, reverse=True):
            d = self.dirs[parts]
            fd = self._walk(parts, "/".join(parts) or ".", make=False)
            try:
                if d.member is not None:
                    self._chown(fd, d.member)
                os.fchmod(fd, d.mode)
                if d.member is not None:
                    self._xattrs(fd, d.member)
                if d.times is not None:
                    os.utime(fd, ns=d.times)
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
