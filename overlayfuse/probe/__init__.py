"""The probe: the one place that decides which backends work here, by trying them for real.

For each backend it mounts a tiny overlay (two lowers, an upper, a work dir) in a scratch dir on
the same filesystem as the upper, deletes a lower file through it and checks that a whiteout
appears in the upper, and writes a file and checks that it lands in the upper.  Asking the
kernel is the only reliable answer: sysctls, LSMs, seccomp, container runtimes and the upper
filesystem's features all have a say, and only a real mount hears all of them.

The kernel trials run in a forked child with a private mount namespace, so a killed probe never
leaves an overlay mounted; the FUSE trial mounts in the caller's namespace (as the FUSE backend
does) and is unmounted in a ``finally``.  Scratch dirs carry the prober's PID; a later probe
removes those whose owner is gone.  Verdicts are cached per kernel release+version, uid and
upper filesystem, so a cached "no" never outlives a kernel change.

One module per concern: ``api`` (``probe()``, where to probe), ``facts`` (the kernel and the
filesystem), ``trials`` (the trial mounts and the upper's check), ``child`` (forked trials),
``scratch`` (scratch dirs and their cleanup), ``unmount`` (taking a FUSE mount down),
``signals`` (signals as clean-ups), ``cache`` (cached verdicts), ``report`` (the answer and its
text/JSON forms), ``cli`` (``overlayfuse check``).  This package re-exports the names the rest
of overlayfuse and the tests import.
"""
from __future__ import annotations

from .api import probe, probe_dir_for
from .cache import cache_key as _cache_key  # the name tests/test_probe.py imports
from .cache import cache_path
from .cli import add_check_parser
from .report import BACKENDS, USERNS_MOUNT_REASON, Report
from .scratch import SCRATCH_PREFIX, rmtree_force
from .signals import deferred_signals, signals_unwind
from .trials import fuse_preconditions
from .unmount import clear_dead_fuse, unmount_fuse

__all__ = ["BACKENDS", "SCRATCH_PREFIX", "USERNS_MOUNT_REASON", "Report", "_cache_key",
           "add_check_parser", "cache_path", "deferred_signals", "fuse_preconditions", "probe",
           "probe_dir_for", "rmtree_force", "signals_unwind", "unmount_fuse", "clear_dead_fuse"]
