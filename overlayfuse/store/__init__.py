"""The layer store: configs of layers with snapshots, mounted or run through any backend.

Modules, bottom up: ``catalog`` (the SQLite tables and what holds a layer), ``locks`` (flock
files), ``disk`` (the directories, half-made things in tmp/), ``copytree`` (``init --from``),
``progress`` (the terminal line), ``store`` (LayerStore: opening, who uses a layer, reap and
gc), ``use`` (taking layers for a mount or run), ``rooted`` (a command with a use's tree as
``/``, through ``overlayfuse.sandbox``), ``config`` (the snapshot operations, mount,
run), ``build`` (step-cached builds), ``cli`` (``overlayfuse store`` and ``build``).
"""
from __future__ import annotations

from .config import Config, Snapshot
from .store import LayerStore, default_base

__all__ = ["Config", "LayerStore", "Snapshot", "default_base"]
