"""The layer store: configs of layers with snapshots, mounted or run through any backend.

Floors, bottom up; a module imports only from the floors below it (tests/test_floors.py):

    catalog      the SQLite tables: configs, refs, layers, steps, what holds a layer
    locks        the flock files that say a layer or a tmp/ entry is in use
    progress     the one terminal line of a long copy or unpack
    stepfile     a build's step file: shell steps, COPY and ENV lines, checked before a build
    stepkey      the chain of a build's step keys
    stepcopy     a build's COPY: its digest, and the copy into the mounted tree
    disk         the directories: layout, tmp/ entries, removal as the layers' owner
    identity     a frozen layer's content identity (computed once, kept in the catalog)
    copytree     ``init --from DIR``: copy a tree into a fresh layer
    tarimport    ``init --from-tar FILE``: unpack a root filesystem tarball into a fresh layer
    ocitar       a store layer (or a chain's merged tree) written as an OCI layer tarball
    ociapply     an OCI layer blob unpacked into a fresh layer, its digests checked
    skopeo       images between registries, OCI layouts and podman through ``skopeo``
    store        the catalog-level LayerStore: opening, who uses a layer, reap and gc
    buildcache   ``build --list`` and ``gc --build-cache``: the cached steps, and pruning them
    use          taking layers for a mount or a run: spec, locks, catalog record
    live         a mounted config's snapshot through its FUSE daemon's control socket
    image        ``store export``, ``init --from-image``: layers out and in as OCI images
    remotecache  a build's steps taken from and given to a registry (``--cache-from/-to``)
    rooted       a command with a use's tree as ``/`` (through ``overlayfuse.sandbox``)
    config       a config's snapshot operations, mounts and runs; Snapshot
    build        step-cached builds of a config
    api          the public LayerStore (adds ``config(name)``) and Config (adds ``build``)
    cli          ``overlayfuse store`` and ``overlayfuse build``

This package's face (below) takes the public names from ``api``.
"""
from __future__ import annotations

from .api import Config, LayerStore
from .config import Snapshot
from .store import default_base

__all__ = ["Config", "LayerStore", "Snapshot", "default_base"]
