"""The probe's entry points: ``probe()`` (cache first, then the trials with signals turned
into clean-ups) and where to probe for a given overlay.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Sequence

from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from .cache import cache_get, cache_key, cache_put
from .report import BACKENDS, Report
from .signals import signals_unwind
from .trials import run_trials

log = logging.getLogger(__name__)


def probe(directory: str | None = None, *, refresh: bool = False,
          backends: Sequence[str] = BACKENDS, use_cache: bool = True) -> Report:
    """Probe the backends for an upper dir on the filesystem of ``directory``.

    ``directory`` must exist and be writable: the scratch dir is made inside it (default: the
    current dir if writable, else the temp dir).  ``refresh`` ignores and replaces the cache.
    """
    directory = os.path.abspath(directory or default_directory())
    if not os.path.isdir(directory):
        raise OverlayfuseError(f"cannot probe {directory}: not a directory")
    key = cache_key(directory)
    if use_cache and not refresh:
        cached = cache_get(key)
        if cached is not None and set(backends) <= set(cached.trials):
            cached.facts.directory = directory
            return cached
    started = time.monotonic()
    with signals_unwind():
        report = run_trials(directory, backends)
    report.seconds = time.monotonic() - started
    report.probed_at = time.time()
    log.debug("probe of %s took %.3f s", directory, report.seconds)
    if use_cache:
        cache_put(key, report)
    return report


def probe_dir_for(spec: OverlaySpec) -> str:
    """Where to probe for ``spec``: a writable dir on the upper's filesystem.

    The upper's parent (where its work dir usually sits too), else the work dir itself (the
    scratch dir is gone before the mount); a read-only overlay has no upper: the temp dir.
    """
    if spec.upperdir is None:
        return default_directory(prefer_cwd=False)
    upper = os.path.abspath(spec.upperdir)
    try:
        dev = os.stat(upper).st_dev
    except OSError as e:
        raise OverlayfuseError(f"upper dir {upper}: {e.strerror}") from None
    candidates = [os.path.dirname(upper)]
    if spec.workdir:
        candidates.append(os.path.abspath(spec.workdir))
    candidates.append(upper)
    for c in candidates:
        try:
            if os.stat(c).st_dev == dev and os.access(c, os.W_OK | os.X_OK):
                return c
        except OSError:
            continue
    raise OverlayfuseError(f"cannot probe the filesystem of {upper}: no writable dir on it")


def default_directory(prefer_cwd: bool = True) -> str:
    """The current dir when it is writable (and ``prefer_cwd``), else the temp dir."""
    if prefer_cwd:
        try:
            cwd = os.getcwd()
            if os.access(cwd, os.W_OK | os.X_OK):
                return cwd
        except OSError:
            pass
    return tempfile.gettempdir()
