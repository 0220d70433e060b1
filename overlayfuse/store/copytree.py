"""Copy a directory tree into a fresh layer, keeping what an overlay layer is made of.

Modes, owners (as root), times, xattrs (``trusted.*`` as root, so a copied layer keeps its
overlay markers), hard links, symlinks, devices and fifos.  File data goes through
``copy_file_range``, which the filesystem may turn into a reflink or a server-side copy.
Symlinks are copied, never followed.
"""
from __future__ import annotations

import errno
import os
import stat

from ..errors import OverlayfuseError
from .progress import Progress


def copy_tree(src: str, dst: str, progress: Progress) -> None:
    """Copy the contents and the root attributes of ``src`` into the existing dir ``dst``."""
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = []
    counts = [0, 0]  # entries, bytes
    try:
        root = os.lstat(src)
        _walk(src, dst, links, dirs, counts, progress)
        dirs.append((dst, root))
        _copy_xattrs(src, dst)
        for path, st in reversed(dirs):  # children first: their times are set before parents'
            _set_attrs(path, st)
    except OSError as e:
        raise OverlayfuseError(f"cannot copy {e.filename or src}: {e.strerror}") from None
    finally:
        progress.done()


def _walk(src: str, dst: str, links: dict[tuple[int, int], str],
          dirs: list[tuple[str, os.stat_result]], counts: list[int], progress: Progress) -> None:
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        s, d = entry.path, os.path.join(dst, entry.name)
        st = entry.stat(follow_symlinks=False)
        counts[0] += 1
        progress.update(f"{counts[0]} entries, {counts[1] // (1 << 20)} MiB")
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(d, 0o700)
            _copy_xattrs(s, d)
            dirs.append((d, st))
            _walk(s, d, links, dirs, counts, progress)
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            os.link(links[key], d)
            continue
        if stat.S_ISREG(st.st_mode):
            _copy_data(s, d)
            counts[1] += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(d, 0o600)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(d, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
        else:
            continue  # sockets: nothing to copy
        _copy_xattrs(s, d)
        _set_attrs(d, st)
        if st.st_nlink > 1:
            links[key] = d


def _copy_data(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            fin.seek(done)
            fout.seek(done)
            while chunk := fin.read(1 << 20):
                fout.write(chunk)


def _copy_xattrs(src: str, dst: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
        except OSError as e:
            # trusted.* and security.* are root's: a normal user copies what it may read
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA):
                raise


def _set_attrs(path: str, st: os.stat_result) -> None:
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
