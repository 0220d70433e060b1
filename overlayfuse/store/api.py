"""The store's public classes: the top floor, where a store hands out configs and a config
builds.

``store.LayerStore`` (the catalog) and ``config.Config`` (the snapshot operations, mounts and
runs) sit below ``build``, which needs a config; the two methods that reach upward
(``LayerStore.config`` and ``Config.build``) live here, so no module imports one above it.
"""
from __future__ import annotations

from . import config as _config
from . import store as _store
from .build import build as _build
from .store import check_name


class Config(_config.Config):
    """``LayerStore(base).config(name)``: snapshots, rollbacks, mounts, runs and builds of one
    config."""

    store: LayerStore

    def build(self, stepfile: str, **kwargs: object) -> int:
        """``overlayfuse build`` on this config (``overlayfuse.store.build.build``)."""
        return _build(self, stepfile, **kwargs)  # type: ignore[arg-type]


class LayerStore(_store.LayerStore):
    """A base directory of layers shared by named configs (``LayerStore(base).config(name)``)."""

    def config(self, name: str) -> Config:
        return Config(self, check_name(name, "config"))
