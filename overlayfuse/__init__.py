"""overlayfuse: overlay filesystems through the kernel where it allows, FUSE where it does not.

    import overlayfuse
    spec = overlayfuse.OverlaySpec(lowerdirs=("/l1", "/l2"), upperdir="/u", workdir="/w")
    with overlayfuse.mount(spec, "/mnt"):
        ...
    status = overlayfuse.run(spec, ["make"])
    print(overlayfuse.probe().format_text())

    config = overlayfuse.LayerStore("/var/tmp/store").config("default")
    with overlayfuse.mount(config, "/mnt"):   # a config's current state, writable
        ...

The submodules ``overlayfuse.probe`` and ``overlayfuse.run`` share names with the functions
below; import from them with ``from overlayfuse.probe import ...`` (the package attribute is
the function).
"""
from __future__ import annotations

from typing import Sequence

from .errors import OverlayfuseError
from .spec import OverlaySpec

# load the submodules first: the functions defined below must win the package attributes
from . import probe as _probe_module  # noqa: E402
from . import run as _run_module  # noqa: E402
from .backends import Mount  # noqa: E402
from .store import Config, LayerStore, Snapshot  # noqa: E402

__all__ = ["OverlaySpec", "OverlayfuseError", "Mount", "LayerStore", "Config", "Snapshot",
           "probe", "mount", "run"]


def probe(directory: str | None = None, *, refresh: bool = False) -> "_probe_module.Report":
    """Which backends work for an upper dir on ``directory``'s filesystem (cached)."""
    return _probe_module.probe(directory, refresh=refresh)


def mount(spec: OverlaySpec | Config | Snapshot, target: str, backend: str = "auto") -> Mount:
    """Mount ``spec`` on ``target``; the handle is a context manager that unmounts.

    ``auto``: the kernel where the caller may mount overlayfs itself, else FUSE; an explicit
    backend that cannot work raises OverlayfuseError with the reason.  A store's config mounts
    its current state writable, a snapshot read-only.
    """
    if isinstance(spec, (Config, Snapshot)):
        return spec.mount(target, backend)
    from .backends.choose import choose
    chosen, _why = choose(spec, "mount", backend)
    return chosen.mount(spec, target)


def run(spec: OverlaySpec | Config | Snapshot | None, argv: Sequence[str],
        **kwargs: object) -> int:
    """Run ``argv`` in the merged tree of ``spec``: its exit status (``overlayfuse.run.run``).

    A config or snapshot runs in its state; ``writable=True`` then means a throwaway upper.
    """
    if isinstance(spec, (Config, Snapshot)):
        return spec.run(argv, **kwargs)  # type: ignore[arg-type]
    return _run_module.run(spec, argv, **kwargs)  # type: ignore[arg-type]
