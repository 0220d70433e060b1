"""The verdict cache: a trial costs a few hundred ms, so reports are kept per kernel
release+version, uid and upper filesystem (and what else decides FUSE here), and a cached "no"
never outlives a kernel change.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

from .. import sysmount
from .report import Report

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
CACHE_MAX_AGE = 7 * 24 * 3600


def cache_path() -> str:
    """The cache file: ``$XDG_CACHE_HOME/overlayfuse/probe.json`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "overlayfuse", "probe.json")


def cache_key(directory: str) -> str:
    """Kernel release+version, uid, upper filesystem, and what else decides FUSE here."""
    u = os.uname()
    st = os.stat(directory)
    fstype = sysmount.mount_fstype(directory) or hex(sysmount.statfs_type(directory))
    try:
        fst = os.stat("/dev/fuse")
        fuse = f"{fst.st_mode:o}:{fst.st_uid}:{os.access('/dev/fuse', os.R_OK | os.W_OK)}"
    except OSError:
        fuse = "none"
    fm = shutil.which("fusermount3") is not None
    return (f"v{CACHE_FORMAT}|{u.release}|{u.version}|uid={os.geteuid()}|fs={fstype}|"
            f"dev={st.st_dev}|fuse={fuse}|fusermount3={fm}")


def _cache_load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
            return data
    except (OSError, ValueError):
        pass
    return {"format": CACHE_FORMAT, "entries": {}}


def cache_get(key: str) -> Report | None:
    """The cached report for ``key``, or None when absent, from another kernel or too old."""
    entry = _cache_load()["entries"].get(key)
    if not entry:
        return None
    # a second guard besides the key: the kernel that answered must be the running one
    u = os.uname()
    rep = Report.from_dict(entry)
    if (rep.facts.kernel_release, rep.facts.kernel_version) != (u.release, u.version):
        return None
    if time.time() - rep.probed_at > CACHE_MAX_AGE:
        return None
    rep.cached = True
    return rep


def cache_put(key: str, report: Report) -> None:
    """Store ``report`` under ``key`` (atomically); a cache that cannot be written is skipped."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _cache_load()
        u = os.uname()
        # drop entries of other kernels: they can never be valid again
        data["entries"] = {k: v for k, v in data["entries"].items()
                           if v.get("kernel") == {"release": u.release, "version": u.version}}
        data["entries"][key] = report.to_dict()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".probe-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot write the probe cache %s: %s", path, e)


def clear_cache() -> None:
    """Forget every cached verdict."""
    try:
        os.unlink(cache_path())
    except FileNotFoundError:
        pass
