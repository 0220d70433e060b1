"""Mounting an overlay with any number of layers, on new kernels and old.

The new mount API first (one ``lowerdir+`` per layer, the kernel's reason on refusal); else
mount(2), and when its one page of options is too small, relative layer paths from a child
process.  Policy on top of the thin wrappers in ``syscalls``.
"""
from __future__ import annotations

import errno
import os
from typing import Sequence

from .syscalls import FsContext, mount

PAGE_LIMIT = 4095           # mount(2) copies at most one page of options, NUL included
FSCONFIG_VALUE_LIMIT = 255  # fsconfig(2) copies at most 256 bytes per string value


def overlay_option_pairs(lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
                         options: Sequence[tuple[str, str | None]] = (), volatile: bool = False,
                         userxattr: bool = False) -> list[tuple[str, str | None]]:
    """The non-lowerdir options of an overlay mount, in the order the kernel expects."""
    pairs: list[tuple[str, str | None]] = []
    if upperdir is not None:
        pairs += [("upperdir", upperdir), ("workdir", workdir)]
    for key, value in options:
        if key in ("lowerdir", "lowerdir+", "upperdir", "workdir", "volatile", "userxattr"):
            continue
        pairs.append((key, value))
    if volatile and upperdir is not None:
        pairs.append(("volatile", None))
    if userxattr:
        pairs.append(("userxattr", None))
    return pairs


def _escape(path: str) -> str:
    """Escape a path for mount(2)'s monolithic overlay option string."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def legacy_data(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]]) -> str:
    """mount(2)'s option string: ``lowerdir=A:B,upperdir=U,...``."""
    items = ["lowerdir=" + ":".join(_escape(p) for p in lowerdirs)]
    for key, value in pairs:
        if value is None:
            items.append(key)
        elif key in ("upperdir", "workdir", "datadir"):
            items.append(f"{key}={_escape(value)}")
        else:
            items.append(f"{key}={value}")
    return ",".join(items)


def mount_overlay(lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
                  target: str, options: Sequence[tuple[str, str | None]] = (),
                  volatile: bool = False, userxattr: bool = False) -> None:
    """Mount an overlay on ``target`` in the current mount namespace, any number of layers.

    The new mount API adds one lower per ``lowerdir+`` call (Linux 6.8+), so no page limit
    applies, and its log gives the kernel's reason for a refusal.  A path longer than fsconfig's
    256-byte value limit is passed as ``/proc/self/fd/N`` of an O_PATH descriptor.  Older kernels
    get mount(2); when the option string exceeds a page, a child process chdirs to the layers'
    common parent and mounts with relative paths (what container storage libraries do).
    Raises ``OSError`` whose message carries the kernel's reason when it gave one.
    """
    if not lowerdirs:
        raise OSError(errno.EINVAL, "an overlay needs at least one lower dir")
    if upperdir is None and len(lowerdirs) == 1:
        # overlayfs wants two lowers when it has no upper: pad with an empty dir.  It must
        # outlive the mount (a deleted lower root reads as empty), so one per user is kept.
        lowerdirs = [lowerdirs[0], empty_dir()]
    pairs = overlay_option_pairs(lowerdirs, upperdir, workdir, options, volatile, userxattr)
    try:
        _mount_fsconfig(lowerdirs, pairs, target)
        return
    except _NoNewAPI:
        pass
    data = legacy_data(lowerdirs, pairs)
    if len(data.encode()) <= PAGE_LIMIT:
        mount("overlay", target, "overlay", 0, data)
    else:
        _mount_relative(lowerdirs, pairs, target)


def empty_dir() -> str:
    """A per-user empty, read-only directory in the temp dir (made once, never removed)."""
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"overlayfuse-empty-{os.geteuid()}")
    for _ in range(2):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path, 0o555)
            except FileExistsError:
                pass
            continue
        import stat as _stat
        if (_stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
                and not os.listdir(path)):
            return path
        break
    # someone else's or not empty: a fresh one (left behind: an empty dir is harmless)
    path = tempfile.mkdtemp(prefix="overlayfuse-empty-")
    os.chmod(path, 0o555)
    return path


class _NoNewAPI(Exception):
    pass


def _mount_fsconfig(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                    target: str) -> None:
    try:
        ctx = FsContext("overlay")
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _NoNewAPI() from e
        raise
    fds: list[int] = []

    def short(path: str) -> str:
        if len(os.fsencode(path)) <= FSCONFIG_VALUE_LIMIT:
            return path
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        fds.append(fd)
        return f"/proc/self/fd/{fd}"

    try:
        ctx.set_string("source", "overlay")
        for i, lower in enumerate(lowerdirs):
            try:
                ctx.set_string("lowerdir+", short(lower))
            except OSError as e:
                # kernels before 6.8 know fsopen but not "lowerdir+"
                if i == 0 and e.errno == errno.EINVAL and "nknown parameter" in str(e):
                    raise _NoNewAPI() from e
                raise
        for key, value in pairs:
            if value is None:
                ctx.set_flag(key)
            elif key in ("upperdir", "workdir", "datadir+"):
                ctx.set_string(key, short(value))
            else:
                ctx.set_string(key, value)
        ctx.create()
        ctx.attach(target)
    finally:
        ctx.close()
        for fd in fds:
            os.close(fd)


def _mount_relative(lowerdirs: Sequence[str], pairs: Sequence[tuple[str, str | None]],
                    target: str) -> None:
    """mount(2) with short relative layer paths, from a child process with its own cwd.

    First choice: cwd at the layers' common parent (what container storage libraries do).  When
    even that exceeds the page, cwd in a temporary directory of symlinks with 1-2 character
    names (base 36), one per layer; overlayfs follows them when it resolves the layers, and
    they are removed once the mount exists.  A child, because chdir is process-wide and the
    caller may have threads; it shares our mount namespace, so its mount is ours.
    """
    dirkeys = ("upperdir", "workdir")
    paths = [os.path.abspath(p) for p in lowerdirs]
    paths += [os.path.abspath(v) for k, v in pairs if k in dirkeys and v]
    base = os.path.commonpath(paths)
    rel = {p: os.path.relpath(p, base) for p in paths}
    data = legacy_data([rel[os.path.abspath(p)] for p in lowerdirs],
                       [(k, rel[os.path.abspath(v)] if k in dirkeys and v else v)
                        for k, v in pairs])
    if len(data.encode()) <= PAGE_LIMIT:
        _mount_from(base, data, target)
        return
    import tempfile
    farm = tempfile.mkdtemp(prefix="overlayfuse-layers-")
    try:
        short: dict[str, str] = {}
        for i, p in enumerate(dict.fromkeys(paths)):
            short[p] = _base36(i)
            os.symlink(p, os.path.join(farm, short[p]))
        data = legacy_data([short[os.path.abspath(p)] for p in lowerdirs],
                           [(k, short[os.path.abspath(v)] if k in dirkeys and v else v)
                            for k, v in pairs])
        if len(data.encode()) > PAGE_LIMIT:
            raise OSError(errno.E2BIG, f"{len(lowerdirs)} layers do not fit in mount(2)'s "
                          "one page of options even with 2-character names")
        _mount_from(farm, data, target)
    finally:
        for name in os.listdir(farm):
            os.unlink(os.path.join(farm, name))
        os.rmdir(farm)


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return out


def _mount_from(cwd: str, data: str, target: str) -> None:
    """mount(2) an overlay from a forked child whose cwd is ``cwd``; errors come back as OSError."""
    target = os.path.abspath(target)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, never back into the caller's code
        try:
            os.close(r)
            os.chdir(cwd)
            mount("overlay", target, "overlay", 0, data)
            os._exit(0)
        except BaseException as e:
            err = getattr(e, "errno", None) or errno.EIO
            os.write(w, f"{err} {getattr(e, 'strerror', None) or e}".encode())
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    if msg:
        num, _, text = msg.partition(" ")
        raise OSError(int(num), text, target)
