"""fuse-overlayfs' own options: what each one does here, checked where the option string is read.

Container engines pass these to their mount program (containers/storage: ``uidmapping=``,
``gidmapping=``, ``squash_to_*``, ...).  Each option is one of:
- FUSE only: it changes what the mount shows, and only the FUSE daemon can do that (the
  kernel's overlayfs has no such option), so ``auto`` picks FUSE and a forced kernel backend is
  an error;
- a FUSE tuning (``timeout=``): used by the daemon, meaningless for a kernel overlay;
- ignored, with the reason (said with ``-v``): the option tunes a part of fuse-overlayfs that
  overlayfuse does not have, or asks for what overlayfuse always does;
- refused, with the reason, where ignoring it would show or store something else than asked.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from .errors import OverlayfuseError
from .idmap import IdMap, parse_id

log = logging.getLogger(__name__)

# key -> True when it takes a value, False for a flag
FUSE_ONLY = {"uidmapping": True, "gidmapping": True, "squash_to_root": False,
             "squash_to_uid": True, "squash_to_gid": True, "static_nlink": False,
             "noxattrs": True, "xattr_permissions": True}
FUSE_TUNING = {"timeout": True, "noacl": False,
               # writeback=1: the kernel's writeback cache (small writes batched in pages)
               "writeback": True,
               # overlayfuse's own: zero-message file opens (fusefs/transport.py)
               "zero_opens": False,
               # overlayfuse's own: microseconds an idle daemon polls for the next request
               "spin": True,
               # overlayfuse's own: plain READDIR where the kernel won't use attributes
               "readdirplus_auto": False}

IGNORED = {
    "threaded": "the daemon serves every request from one trio thread (pyfuse3 has no "
                "multi-threaded loop); slow calls already run in worker threads",
    "fast_ino": "inode numbers are always the layers' own, found by the lookup itself: "
                "there is no slower check to skip",
    "fsync": "fsync always reaches the upper filesystem, as with the kernel's overlayfs; "
             "the volatile option skips it",
}
# the default value of an option that only FUSE honours: nothing to do, any backend will do
DEFAULT_IS_IGNORED = {"noxattrs": "0", "xattr_permissions": "0", "writeback": "0"}
INT_VALUED = ("threaded", "fast_ino", "writeback", "xattr_permissions", "fsync", "noxattrs")

FUSE, IGNORE = "fuse", "ignore"
MAX_SPIN_US = 10000
DEFAULT_SPIN_US = 200  # the idle spin a mount gets without spin= (fusefs/transport.py)

REFUSED = {
    "plugins": "fuse-overlayfs' layer plugins (shared objects loaded into the daemon) are not "
               "supported by overlayfuse",
    "ino32_t": "overlayfuse does not truncate inode numbers to 32 bits",
}


def _check_int(key: str, value: str) -> None:
    if not value.lstrip("-").isdigit():
        raise OverlayfuseError(f"{key}={value}: expected a number")


def check(key: str, value: str | None) -> str | None:
    """What to do with one of fuse-overlayfs' options: ``FUSE`` (keep it for the daemon),
    ``IGNORE`` (accept it, with a note for -v), or None for an option that is not one of
    them.  Raises OverlayfuseError for a refused option or a bad value (one line, naming the
    option)."""
    if key in REFUSED:
        raise OverlayfuseError(f"option {key} is refused: {REFUSED[key]}")
    known = FUSE_ONLY.get(key, FUSE_TUNING.get(key))
    if known is None and key not in IGNORED:
        return None
    has_value = value is not None
    takes_value = known if known is not None else True
    if has_value != takes_value:
        raise OverlayfuseError(f"option {key} takes a value ({key}=...)" if takes_value
                               else f"option {key} takes no value")
    if key in ("uidmapping", "gidmapping"):
        IdMap.parse(value, key)
    elif key in ("squash_to_uid", "squash_to_gid"):
        parse_id(value, key)
    elif key == "timeout":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise OverlayfuseError(f"timeout={value}: expected seconds (a number >= 0)")
    elif key == "spin":
        if not value.isdigit() or int(value) > MAX_SPIN_US:
            raise OverlayfuseError(f"spin={value}: expected microseconds, 0 to {MAX_SPIN_US}")
    elif key in INT_VALUED:
        _check_int(key, value)
        if key == "xattr_permissions" and value not in ("0", "1", "2"):
            raise OverlayfuseError(f"xattr_permissions={value}: expected 0, 1 or 2")
    if key in IGNORED or (key in DEFAULT_IS_IGNORED and DEFAULT_IS_IGNORED[key] == value):
        return IGNORE
    return FUSE


def is_mapping_continuation(item: str) -> bool:
    """``1:110000:65536`` after ``uidmapping=0:1000:1``: the man page's comma-separated form."""
    fields = [f for f in item.split(":") if f]
    return bool(fields) and len(fields) % 3 == 0 and all(f.isdigit() for f in fields)


def ignored_notes(items: Iterable[str]) -> list[str]:
    """One sentence per ignored fuse-overlayfs option in ``items`` (for ``-v``)."""
    notes = []
    for item in items:
        key, _, value = item.partition("=")
        if key in IGNORED:
            notes.append(f"option {item} accepted and ignored: {IGNORED[key]}")
        elif key in DEFAULT_IS_IGNORED and DEFAULT_IS_IGNORED[key] == value:
            notes.append(f"option {item} accepted and ignored: it is the default")
    return notes


def log_ignored(items: Iterable[str]) -> None:
    for note in ignored_notes(items):
        log.info("%s", note)
