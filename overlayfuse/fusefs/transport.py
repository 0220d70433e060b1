"""What the pyfuse3 binding offers: stock, or patched for zero-message opens.

tools/pyfuse3/ holds our small patch to pyfuse3 3.5.0, applied to the pinned sdist by
tools/setup.sh: requests with file handle 0 name their inode (``Operations.inode_as_fh``), an
OPENDIR reply can ask for ``cache_readdir``, and a filesystem can decline atomic O_TRUNC.  With
it the daemon answers OPEN and OPENDIR with ENOSYS, and the kernel stops sending OPEN, FLUSH,
RELEASE, OPENDIR and RELEASEDIR and caches listings (PYFUSE3-FACTS: "Zero-message opens").  On
stock pyfuse3 every handler sees file handle 0 in that mode, so there the daemon opens files
the classic way: slower, the same behaviour.
"""
from __future__ import annotations

import os

import pyfuse3

CLASSIC_ENV = "OVERLAYFUSE_CLASSIC_OPENS"  # "1": classic opens even on the patched binding


def patched() -> bool:
    """The binding carries our patch (its three hooks are all there)."""
    return (hasattr(pyfuse3.Operations, "inode_as_fh")
            and hasattr(pyfuse3.Operations, "enable_atomic_o_trunc")
            and hasattr(pyfuse3.FileInfo(), "cache_readdir"))


def zero_message_opens() -> bool:
    """Whether a daemon started now uses zero-message opens."""
    return patched() and os.environ.get(CLASSIC_ENV) != "1"


def describe() -> str:
    """One phrase for ``check`` and ``-v``."""
    if zero_message_opens():
        return "zero-message opens and kernel-cached listings (patched pyfuse3)"
    if patched():
        return f"classic opens ({CLASSIC_ENV}=1; the patched pyfuse3 is installed)"
    return ("classic opens (stock pyfuse3: every open, close and listing costs requests; "
            "tools/setup.sh builds the patched one)")
