"""Taking layers for a mount or a run: the spec, the locks, and the catalog record.

A use is made in one transaction: the upper is allocated lazily (a fresh child of the current
layer when the current upper is frozen), every layer of the chain is locked (shared as a lower,
exclusive as the upper) and, for a mount, the mount point is recorded.  Whoever holds the
descriptors holds the layers: this process, or the FUSE daemon it forks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from . import catalog as cat
from .disk import TmpEntry, as_owner, make_layer_root
from .locks import LayerLocks, lock_all
from .store import LayerStore

# the kernel's OVL_MAX_STACK; the FUSE backend is held to the same so every backend can serve
MAX_LOWERS = 500


@dataclass
class Use:
    """Layers taken for one mount or run; ``release`` lets go of all of it."""

    store: LayerStore
    spec: OverlaySpec
    layers: tuple[str, ...]          # the upper first when writable, then the lowers
    locks: LayerLocks
    row: str | None = None           # the mounts row (mount point or run key)
    tmp: TmpEntry | None = None      # a throwaway upper, removed on release

    def record(self, backend: str, pid: int | None) -> None:
        if self.row is None:
            return
        with self.store.txn() as conn:
            conn.execute("UPDATE mounts SET backend=?, pid=? WHERE mountpoint=?",
                         (backend, pid, self.row))

    def release(self, forget: bool = True) -> None:
        """Close our lock fds (a FUSE daemon keeps its copies), drop the row when ``forget``."""
        self.locks.release()
        if self.tmp is not None:
            self.tmp.close()
            self.tmp = None
        if forget and self.row is not None:
            with self.store.txn() as conn:
                conn.execute("DELETE FROM mounts WHERE mountpoint=?", (self.row,))
            self.row = None


def take(store: LayerStore, config: str, *, mode: str, row: str | None = None,
         snapshot: str | None = None, top: str | None = None) -> Use:
    """Take the layers of ``config`` (or of its ``snapshot``) for a use.

    ``mode``: ``upper`` writes into the config's upper (allocated lazily), ``throwaway`` stacks
    a fresh upper in tmp/ on top of the current state (unsaved changes included), ``readonly``
    only the lowers.  ``row`` records a mount point (or a run) under that key.  ``top``
    names a layer to stack on instead of a snapshot (a build step's parent).
    """
    layout = store.layout
    owner = store.owner
    fresh = TmpEntry(layout, "new-" + os.urandom(6).hex()) if mode != "readonly" else None
    try:
        with store.txn() as conn:
            store.settle(conn)  # a switch a killed command left open decides the upper
            if not cat.config_exists(conn, config):
                raise OverlayfuseError(f"no config {config!r} in the store {store.base}")
            if top is not None:
                if top not in cat.layer_ids(conn):
                    raise OverlayfuseError(f"layer {top} of config {config!r} is gone")
                lowers = cat.chain(conn, top)
            elif snapshot is not None:
                top = cat.ref(conn, config, snapshot)
                if top is None:
                    raise OverlayfuseError(f"no snapshot {snapshot!r} in config {config!r}")
                lowers = cat.chain(conn, top)
            else:
                upper = cat.ref(conn, config, cat.UPPER)
                current = cat.ref(conn, config, cat.CURRENT)
                assert upper is not None and current is not None
                lowers = cat.chain(conn, current)
                if upper != current and mode != "upper":
                    lowers.insert(0, upper)  # unsaved changes are part of the current state
            if len(lowers) > MAX_LOWERS:
                raise OverlayfuseError(
                    f"config {config!r} stacks {len(lowers)} layers, more than the {MAX_LOWERS} "
                    "an overlay can (take fewer snapshots, or build from a flattened copy)")
            if row is not None:
                clash = conn.execute("SELECT 1 FROM mounts WHERE mountpoint=?", (row,)).fetchone()
                if clash and any(r.mountpoint == row for r in store.mount_rows(conn)):
                    raise OverlayfuseError(f"{row} is already a mount of this store")
            if mode == "upper":
                # a frozen upper gets a child; only a live one can be busy
                why = upper != current and (store.writer_of(conn, upper)
                                            or store.reader_of(conn, upper))
                if why:
                    raise OverlayfuseError(f"config {config!r} is {why}")
                if upper == current:
                    upper = cat.new_layer_id()
                    layer_dir = os.path.join(fresh.path, "layer")
                    work_dir = os.path.join(fresh.path, "work")
                    make_layer_root(layer_dir, layout.layer(current), owner)
                    make_layer_root(work_dir, None, owner)
                    cat.add_layer(conn, upper, current)
                    cat.set_ref(conn, config, cat.UPPER, upper)
                    # its root keeps the current root's mode, which may deny its owner writes
                    dest = layout.layer(upper)
                    as_owner(lambda: os.rename(layer_dir, dest))
                    os.rename(work_dir, layout.work(upper))
                elif not os.path.isdir(layout.work(upper)):
                    make_layer_root(layout.work(upper), None, owner)
                layers = (upper, *lowers)
                locks = lock_all([(layout.lock(upper), True)]
                                 + [(layout.lock(x), False) for x in lowers])
                spec = OverlaySpec(lowerdirs=tuple(layout.layer(x) for x in lowers),
                                   upperdir=layout.layer(upper), workdir=layout.work(upper),
                                   options=store.options)
            else:
                layers = tuple(lowers)
                locks = lock_all([(layout.lock(x), False) for x in lowers])
                if mode == "throwaway":
                    assert fresh is not None
                    up, work = os.path.join(fresh.path, "upper"), os.path.join(fresh.path, "work")
                    make_layer_root(up, layout.layer(lowers[0]), owner)
                    make_layer_root(work, None, owner)
                    spec = OverlaySpec(lowerdirs=tuple(layout.layer(x) for x in lowers),
                                       upperdir=up, workdir=work, options=store.options)
                else:
                    spec = OverlaySpec(lowerdirs=tuple(layout.layer(x) for x in lowers),
                                       options=store.options)
            if locks is None:
                who = store.writer_of(conn, lowers[0]) if mode != "upper" else None
                raise OverlayfuseError(f"config {config!r} is {who or 'in use by another writer'}")
            if row is not None:
                conn.execute("INSERT OR REPLACE INTO mounts(mountpoint, config, backend, "
                             "writable, pid, layers) VALUES (?, ?, 'pending', ?, ?, ?)",
                             (row, config, int(mode == "upper"), os.getpid(), " ".join(layers)))
    except BaseException:
        if fresh is not None:
            fresh.close()
        raise
    if mode == "throwaway":
        return Use(store, spec, layers, locks, row, tmp=fresh)
    if fresh is not None:
        fresh.close()
    return Use(store, spec, layers, locks, row)
