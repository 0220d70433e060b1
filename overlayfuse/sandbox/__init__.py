"""A command run with a given directory as ``/``, in namespaces of its own.

Knows nothing of layers or stores: the store hands it a root (and a ``prepare`` that mounts
it) and a command.  Floors, bottom up: ``process`` (fork/exec, relays, signals, status),
``idmaps`` (the user namespace's map), ``rootfs`` (mounts under the tree, pivot_root),
``launch`` (``Sandbox`` and ``run``), ``mapped`` (a function as root of the user's map).
Imports only ``sysmount``, ``errors`` and the stdlib.

    from overlayfuse.sandbox import Bind, Sandbox, run
    status = run(Sandbox("/var/tmp/tree", binds=(Bind.parse("/src:/src:ro"),)), ["make"])
"""
from __future__ import annotations

from .idmaps import IdPlan, IdRange, plan_ids
from .launch import Sandbox, run
from .mapped import run_as_mapped_root
from .process import SETUP_FAILED, CommandError
from .rootfs import Bind

__all__ = ["Bind", "CommandError", "IdPlan", "IdRange", "SETUP_FAILED", "Sandbox", "plan_ids",
           "run", "run_as_mapped_root"]
