"""A build cache shared through a registry (or an OCI layout): ``--cache-from`` / ``--cache-to``.

A step's layer travels as the image ``REF:KEY`` (its chain below it, one OCI layer each), the
tag being the step's key: keys start from the base's content identity (``stepkey``), so a
store on another machine that builds the same steps on the same base asks for the same tags.
A lookup is one manifest request; the first miss ends the lookups of a build (every key after
it chains on a step that must run here).  An unreachable cache to take from is one warning and
the build goes on without it, as BuildKit does; one to give to that fails stops the build (the
user asked for it).  Layers taken are shared by chain ID with what the store has (``image``).
"""
from __future__ import annotations

import sqlite3
import sys
from typing import Callable

from ..errors import OverlayfuseError
from .image import image_exists, import_image, push_layer
from .skopeo import Access, check_ref
from .store import LayerStore


class RemoteCache:
    """Where a build takes steps from and gives them to (either may be None)."""

    def __init__(self, cache_from: str | None, cache_to: str | None,
                 access: Access = Access()) -> None:
        for ref, what in ((cache_from, "--cache-from"), (cache_to, "--cache-to")):
            if ref is not None:
                check_ref(ref, what)
                if ref.startswith(("oci-archive:", "containers-storage:")):
                    raise OverlayfuseError(f"{what} {ref}: a registry repository "
                                           "(docker://HOST/NAME) or an OCI layout (oci:DIR)")
                if ref.startswith("docker://") and ":" in ref[len("docker://"):].rpartition(
                        "/")[2]:
                    raise OverlayfuseError(f"{what} {ref}: name a repository without a tag "
                                           "(each step is a tag of it)")
        self.cache_from = cache_from
        self.cache_to = cache_to
        self.access = access
        self._missed = cache_from is None

    def take(self, store: LayerStore, key: str,
             hold: Callable[[sqlite3.Connection, str], None]) -> str | None:
        """The layer of the step keyed ``key`` from ``--cache-from`` (recorded by ``hold`` in
        the transaction that adds it), or None: not there, or an earlier step missed."""
        if self._missed:
            return None
        assert self.cache_from is not None
        src = f"{self.cache_from}:{key}"
        try:
            if not image_exists(src, self.access):
                self._missed = True
                return None
            return import_image(store, src, hold, access=self.access).top
        except OverlayfuseError as e:
            self._missed = True
            print(f"overlayfuse build: warning: --cache-from {self.cache_from}: {e}; "
                  "building without it", file=sys.stderr, flush=True)
            return None

    def give(self, store: LayerStore, layer: str, key: str) -> bool:
        """Store ``layer`` as the step keyed ``key`` in ``--cache-to`` unless it is there;
        whether it was pushed now."""
        if self.cache_to is None or image_exists(f"{self.cache_to}:{key}", self.access):
            return False
        push_layer(store, layer, self.cache_to, key, self.access)
        return True
