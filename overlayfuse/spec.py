"""OverlaySpec: what to mount (layers and options), parsed from and formatted to option strings.

One grammar serves ``mount -t overlay``, fuse-overlayfs and us: items separated by ``,``; a
backslash escapes the next character (``\\,`` ``\\:`` ``\\\\`` ``\\"``), as the kernel's
overlayfs reads it; ``lowerdir=`` lists the lower dirs top first, separated by unescaped ``:``; a
double-quoted value (``context="a,b"``) may hold commas, as libmount allows.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import fuseopts
from .errors import OverlayfuseError

Option = tuple[str, str | None]

# Overlay options kept in the spec: they change what the overlay does, so every backend must
# see them (and may refuse them).
OVERLAY_KEYS = frozenset({"redirect_dir", "index", "xino", "metacopy", "nfs_export", "uuid",
                          "verity"})
OVERLAY_FLAGS = frozenset({"userxattr"})

# Mount options that do not change the overlay's contents: accepted and handed back separately
# (a backend may apply them to the mount, e.g. ``ro`` or ``nodev``, or ignore them).
HARMLESS_FLAGS = frozenset({
    "ro", "rw", "defaults", "lazytime", "nolazytime", "noatime", "atime", "relatime",
    "norelatime", "strictatime", "nostrictatime", "nodiratime", "diratime", "nodev", "dev",
    "nosuid", "suid", "noexec", "exec", "sync", "async", "dirsync", "symfollow", "nosymfollow",
    "silent", "loud", "auto", "noauto", "nofail", "user", "nouser", "users", "owner", "group",
    "_netdev", "allow_other", "allow_root", "default_permissions", "auto_unmount",
    "debug",  # libfuse's -o debug (fuse-overlayfs takes it): the command line turns it into -d
})
HARMLESS_KEYS = frozenset({
    "context", "fscontext", "defcontext", "rootcontext", "max_read", "blksize",
    "fsname", "subtype", "comment",
})
HARMLESS_PREFIXES = ("x-",)  # x-systemd.* and friends from /etc/fstab

# Harmless options a backend applies to the mount itself, each with its opposite: the last one
# given wins, as with mount(8).
MOUNT_FLAG_PAIRS = (("ro", "rw"), ("nodev", "dev"), ("nosuid", "suid"), ("noexec", "exec"),
                    ("sync", "async"), ("noatime", "atime"))


def last_wins(other: Sequence[str]) -> dict[str, str]:
    """For each flag pair, the member given last (pairs never given are absent)."""
    chosen: dict[str, str] = {}
    for item in other:
        for on, off in MOUNT_FLAG_PAIRS:
            if item in (on, off):
                chosen[on] = item
    return chosen

PATH_KEYS = ("lowerdir", "upperdir", "workdir")


@dataclass(frozen=True)
class OverlaySpec:
    """Layers and overlay options, independent of the backend that mounts them.

    ``lowerdirs`` are absolute paths, topmost first (as in ``lowerdir=``); ``upperdir`` and
    ``workdir`` are both set or both ``None`` (a read-only overlay).
    """

    lowerdirs: tuple[str, ...]
    upperdir: str | None = None
    workdir: str | None = None
    volatile: bool = False
    # overlay options kept as given (redirect_dir, index, xino, metacopy, userxattr, ...)
    options: tuple[tuple[str, str | None], ...] = field(default=())
    # fuse-overlayfs' options for the daemon (uidmapping, squash_to_*, timeout, ...): see
    # fuseopts.py; a kernel overlay never sees them
    fuse_options: tuple[tuple[str, str | None], ...] = field(default=())

    @property
    def needs_fuse(self) -> str | None:
        """Why only the FUSE backend can mount this spec (an option the kernel lacks), or None."""
        keys = [k for k, _ in self.fuse_options if k in fuseopts.FUSE_ONLY]
        if not keys:
            return None
        return (", ".join(dict.fromkeys(k + "=" if fuseopts.FUSE_ONLY[k] else k for k in keys))
                + " can only be honoured by the FUSE backend")

    def fuse_option_map(self) -> dict[str, str | None]:
        """The FUSE options as a dict (the last value of a repeated key wins)."""
        return dict(self.fuse_options)

    @property
    def readonly(self) -> bool:
        return self.upperdir is None

    @property
    def userxattr(self) -> bool:
        """The ``userxattr`` flag: the overlay's markers are ``user.overlay.*``."""
        return any(key == "userxattr" for key, _ in self.options)

    @classmethod
    def from_options(cls, text: str, cwd: str | None = None) -> "OverlaySpec":
        """The spec of an option string; harmless mount options are dropped (see
        :func:`parse_options` to keep them)."""
        return parse_options(text, cwd)[0]

    def to_options(self) -> str:
        """The option string of this spec (paths escaped); ``parse_options`` reads it back."""
        items = ["lowerdir=" + ":".join(escape(p) for p in self.lowerdirs)]
        if self.upperdir is not None:
            items.append("upperdir=" + escape(self.upperdir))
        if self.workdir is not None:
            items.append("workdir=" + escape(self.workdir))
        if self.volatile:
            items.append("volatile")
        items += [key if value is None else f"{key}={value}"
                  for key, value in self.options + self.fuse_options]
        return ",".join(items)

    def option(self, key: str, default: str | None = None) -> str | None:
        """The value of overlay option ``key`` (the last one given), else ``default``."""
        for k, v in reversed(self.options):
            if k == key:
                return v
        return default


def escape(path: str) -> str:
    """Escape a path for an option value: ``\\``, ``,``, ``:`` and ``"`` get a backslash."""
    for c in ("\\", ",", ":", '"'):
        path = path.replace(c, "\\" + c)
    return path


def split_unescaped(text: str, sep: str) -> list[str]:
    """Split ``text`` at each ``sep`` not escaped by a backslash nor inside double quotes;
    the pieces keep their escapes (the caller unescapes what it needs to)."""
    parts, cur, quoted, i = [], [], False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    """Drop the escaping backslashes (``\\x`` becomes ``x``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def _resolve(path: str, cwd: str, what: str) -> str:
    """An absolute real path: relative paths (and relative symlinks) count from ``cwd``."""
    if not path:
        raise OverlayfuseError(f"empty path in {what}=")
    return os.path.realpath(os.path.join(cwd, path))


def _is_harmless(key: str, has_value: bool) -> bool:
    if key.startswith(HARMLESS_PREFIXES):
        return True
    return key in (HARMLESS_KEYS if has_value else HARMLESS_FLAGS)


def parse_options(text: str, cwd: str | None = None) -> tuple[OverlaySpec, tuple[str, ...]]:
    """Parse a mount(8)-style option string into the spec and the other (harmless) options.

    Empty items (``a,,b``) are ignored; a later ``lowerdir=``/``upperdir=``/``workdir=``
    replaces an earlier one, as mount(8) merges repeated ``-o``.  Raises OverlayfuseError for
    an unknown option, a missing ``lowerdir=``, or an upper dir without a work dir (or the
    reverse).  Nothing is checked on disk here: see :mod:`overlayfuse.validate`.
    """
    base = os.getcwd() if cwd is None else cwd
    lowers: list[str] | None = None
    upper = work = None
    volatile = False
    options: list[Option] = []
    fuse_options: list[Option] = []
    other: list[str] = []
    previous = ""
    for item in split_unescaped(text, ","):
        if not item:
            continue
        if previous in ("uidmapping", "gidmapping") and fuseopts.is_mapping_continuation(item):
            key, value = fuse_options.pop()  # the ranges after a ',' (fuse-overlayfs' man page)
            item = f"{key}={value}:{item}"
        key, eq, value = item.partition("=")
        previous = key
        has_value = bool(eq)
        if key == "lowerdir" and has_value:
            if not value:
                raise OverlayfuseError("lowerdir= names no directory")
            parts = split_unescaped(value, ":")
            if any(not p for p in parts):
                raise OverlayfuseError(
                    f"empty lower dir in lowerdir={value} (data-only lower layers '::' are "
                    "not supported)")
            lowers = [_resolve(unescape(p), base, key) for p in parts]
        elif key == "upperdir" and has_value:
            upper = _resolve(unescape(value), base, key)
        elif key == "workdir" and has_value:
            work = _resolve(unescape(value), base, key)
        elif key == "volatile" and not has_value:
            volatile = True
        elif (key in OVERLAY_KEYS and has_value) or (key in OVERLAY_FLAGS and not has_value):
            options.append((key, value if has_value else None))
        elif (kind := fuseopts.check(key, value if has_value else None)) is not None:
            if kind == fuseopts.IGNORE:
                other.append(item)
            else:
                fuse_options.append((key, value if has_value else None))
        elif _is_harmless(key, has_value):
            other.append(item)
        else:
            raise OverlayfuseError(f"unknown option {item!r}" if not has_value
                                   else f"unknown option {key!r} (in {item!r})")
    if lowers is None:
        raise OverlayfuseError("the options name no lower dir (lowerdir=...)")
    if (upper is None) != (work is None):
        given, missing = ("upperdir", "workdir") if work is None else ("workdir", "upperdir")
        raise OverlayfuseError(f"{given}= needs {missing}= too")
    spec = OverlaySpec(lowerdirs=tuple(lowers), upperdir=upper, workdir=work,
                       volatile=volatile, options=tuple(options),
                       fuse_options=tuple(fuse_options))
    return spec, tuple(other)
