"""Choosing a backend: ``auto`` follows the probe's verdicts, an explicit name never falls back."""
from __future__ import annotations

import logging

from ..probe import probe as run_probe
from ..probe import fuse_preconditions, probe_dir_for
from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from ..survey import refusal
from .base import Backend, Purpose
from .fuse import FuseBackend
from .kernel import KernelBackend
from .userns import UsernsBackend

log = logging.getLogger(__name__)

BACKEND_NAMES: tuple[str, ...] = ("kernel", "kernel-userns", "fuse")
PREFERENCE: dict[str, tuple[str, ...]] = {
    # a mount must be visible to every process of the user (an IDE): no private namespaces
    "mount": ("kernel", "fuse"),
    "run": ("kernel", "kernel-userns", "fuse"),
}


def get_backend(name: str) -> Backend:
    """The backend object for a name (``kernel``, ``kernel-userns``, ``fuse``)."""
    classes = {"kernel": KernelBackend, "kernel-userns": UsernsBackend, "fuse": FuseBackend}
    try:
        return classes[name]()
    except KeyError:
        raise OverlayfuseError(f"unknown backend {name!r} (choose from auto, "
                               + ", ".join(BACKEND_NAMES) + ")") from None


def choose(spec: OverlaySpec, purpose: Purpose, backend: str = "auto", *,
           refresh: bool = False) -> tuple[Backend, str]:
    """The backend for ``purpose`` and a sentence explaining the choice (for ``-v``).

    ``auto`` takes the first backend of the preference list that the probe accepts for the
    upper dir's filesystem and that shows the layers as their writer left them (survey.py: a
    normal user's redirects and hard-link index are lost on kernel-userns); an explicit name is
    checked for both and, when it can't work, is an error carrying the reason, never a silent
    fallback.  Explicit ``fuse`` skips the trial: its own mount reports any failure.
    """
    if purpose not in PREFERENCE:
        raise OverlayfuseError(f"unknown purpose {purpose!r}")
    fuse_only = fuse_only_options(spec, purpose, backend)
    if backend == "fuse" or fuse_only:
        # asked for by name: no trial daemon first (the mount itself is the trial and its
        # error the reason), only the checks that need no mount
        chosen = get_backend("fuse")
        why_not = fuse_preconditions() or refusal(spec, "fuse")
        if why_not:
            raise OverlayfuseError(f"backend fuse cannot {purpose} here: {why_not}")
        return chosen, f"backend fuse (auto: {fuse_only})" if fuse_only else \
            "backend fuse (asked for)"
    where = probe_dir_for(spec)
    report = run_probe(where, refresh=refresh).consider(spec)
    if backend != "auto":
        chosen = get_backend(backend)
        verdict = report.verdict(backend, purpose)
        if not verdict.ok:
            raise OverlayfuseError(f"backend {backend} cannot {purpose} here: {verdict.reason}")
        why = f"backend {backend} (asked for): {verdict.reason}"
        log.debug("%s", why)
        return chosen, why
    refused: list[str] = []
    for name in PREFERENCE[purpose]:
        verdict = report.verdict(name, purpose)
        if verdict.ok:
            why = f"backend {name} (auto, {report.facts.fs_type} at {where}): {verdict.reason}"
            if refused:
                why += "; not " + "; not ".join(refused)
            log.debug("%s", why)
            return get_backend(name), why
        refused.append(f"{name}: {verdict.reason}")
    raise OverlayfuseError(f"no backend can {purpose} this overlay here: " + "; ".join(refused))


def fuse_only_options(spec: OverlaySpec, purpose: Purpose, backend: str) -> str | None:
    """With options only the FUSE daemon can honour (uidmapping=, squash_to_*, ...: see
    fuseopts.py), ``auto`` means FUSE: the reason, for -v.  A kernel backend asked for by
    name is an error then, never a mount that silently drops the options."""
    why = spec.needs_fuse
    if why is None or backend == "fuse":
        return None
    if backend != "auto":
        raise OverlayfuseError(f"backend {backend} cannot {purpose} this overlay: {why}")
    return why
