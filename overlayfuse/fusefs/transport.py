"""What the pyfuse3 binding offers, and which of its zero-message modes a mount uses.

tools/pyfuse3/ holds our small patch to pyfuse3 3.5.0, applied to the pinned sdist by
tools/setup.sh: requests with file handle 0 name their inode (``Operations.inode_as_fh``), an
OPENDIR reply can ask for ``cache_readdir``, and a filesystem can decline atomic O_TRUNC.  With
it the daemon can answer OPENDIR, and OPEN, with ENOSYS; the kernel then stops sending them (and
RELEASEDIR, FLUSH, RELEASE) for the whole mount (PYFUSE3-FACTS: "Zero-message opens"):

- zero-message directories, always on the patched binding: the kernel caches listings and
  drops them on its own changes to a dir, which are the only changes there are;
- zero-message file opens, with ``-o zero_opens``: warm opens cost no request at all, but the
  daemon never hears of an open, so a lower file is copied up at its first change instead of at
  an open for write (the merged view is the same; only a look into the upper dir between the
  open and the first write tells).  Off by default, to keep the kernel's copy-up timing.

Stock pyfuse3 hands every handler file handle 0 in those modes, so there the daemon opens files
and dirs the classic way: slower, the same behaviour.

A fourth patch adds ``Operations.fallocate``: fallocate(2) then reaches the upper file as on the
kernel's overlay.  Stock pyfuse3 has no such handler, libfuse answers ENOSYS and callers get
EOPNOTSUPP (the kernel never asks again); nothing else changes.  A fifth lets the daemon decline
the kernel's asynchronous direct I/O, so that the kernel drops the pages a direct write made
stale itself (file.py says what stock pyfuse3 costs there).  A sixth changes only the request
loop (no API): an idle daemon waits for the next request in poll() instead of a round trip
through trio, and a second reader task starts only when a handler suspends.  A seventh lets
that loop poll the FUSE fd for a few tens of microseconds before it sleeps (``-o spin=US``,
200 by default, 0 off): a caller's next request then finds the daemon awake (``set_idle_spin``).
An eighth lets the kernel ask plain READDIR where it will not use the attributes
(``-o readdirplus_auto``, ``OverlayOperations.enable_readdirplus_auto``, readdir.py); stock
pyfuse3 asks READDIRPLUS for every chunk of a listing, as the default does.
"""
from __future__ import annotations

import os

import pyfuse3

from ..fuseopts import DEFAULT_SPIN_US

OPENS_ENV = "OVERLAYFUSE_OPENS"  # "classic": neither mode; "zero": file opens too, every mount


def patched() -> bool:
    """The binding carries our patch (its three hooks are all there)."""
    return (hasattr(pyfuse3.Operations, "inode_as_fh")
            and hasattr(pyfuse3.Operations, "enable_atomic_o_trunc")
            and hasattr(pyfuse3.FileInfo(), "cache_readdir"))


def has_fallocate() -> bool:
    """The binding passes fallocate(2) on (tools/pyfuse3/fallocate.patch)."""
    return hasattr(pyfuse3.Operations, "fallocate")


def declines_async_dio() -> bool:
    """The binding can turn the kernel's asynchronous direct I/O off
    (tools/pyfuse3/async-dio.patch): the kernel then drops the pages a direct write made stale
    itself, and the daemon need not (file.py)."""
    return hasattr(pyfuse3.Operations, "enable_async_dio")


def has_idle_spin() -> bool:
    """The request loop can spin before it sleeps (tools/pyfuse3/request-loop-spin.patch)."""
    return hasattr(pyfuse3, "set_idle_spin")


def set_idle_spin(microseconds: int) -> bool:
    """Let the idle request loop poll this long before it sleeps
    (tools/pyfuse3/request-loop-spin.patch); False where the binding cannot.

    On an idle machine the daemon used to sleep between a reply and the caller's next request
    and pay a wake-up (25-70 us of wall time here) for each; polling meanwhile spares it, at the
    CPU of the polling.  The loop spins only after a short wait, so an idle mount costs
    nothing and only a stream of requests pays.  Measured in bench/ (``overlayfuse-nospin``)."""
    if not has_idle_spin():
        return False
    pyfuse3.set_idle_spin(microseconds / 1e6)
    return True


def modes(zero_opens: bool) -> tuple[bool, bool]:
    """(zero-message dirs, zero-message file opens) for a mount (``-o zero_opens`` asked
    for the second)."""
    forced = os.environ.get(OPENS_ENV, "")
    if not patched() or forced == "classic":
        return False, False
    return True, zero_opens or forced == "zero"


def describe(zero_opens: bool = False, spin_us: int = DEFAULT_SPIN_US) -> str:
    """One phrase for ``check`` and ``-v``."""
    falloc = ("fallocate passed on" if has_fallocate()
              else "no fallocate: EOPNOTSUPP (pyfuse3 without tools/pyfuse3/fallocate.patch)")
    return f"{_opens(zero_opens)}; {falloc}; {_spin(spin_us)}"


def _spin(spin_us: int) -> str:
    if not has_idle_spin():
        return "no idle spin (pyfuse3 without tools/pyfuse3/request-loop-spin.patch)"
    if spin_us == 0:
        return "no idle spin (spin=0)"
    return f"idle spin {spin_us} us"


def _opens(zero_opens: bool) -> str:
    dirs, files = modes(zero_opens)
    if files:
        return "zero-message opens and kernel-cached listings (patched pyfuse3)"
    if dirs:
        return ("kernel-cached listings, classic file opens (patched pyfuse3; -o zero_opens "
                "for zero-message file opens)")
    if patched():
        return f"classic opens ({OPENS_ENV}=classic; the patched pyfuse3 is installed)"
    return ("classic opens (stock pyfuse3: every open, close and listing costs requests; "
            "tools/setup.sh builds the patched one)")
