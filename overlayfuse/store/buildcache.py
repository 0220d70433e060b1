"""The build cache made visible and bounded: ``build --list`` and ``gc --build-cache``.

A cached step is a ``steps`` row (its config, number, text, key, layer, when it was last used).
It is *needed* while its layer is part of what a config shows or keeps: the chain of any
reference (current state, upper, base, a snapshot, a failed step).  Pruning removes rows of
unneeded steps, least recently used first (as ``buildx prune`` and vagga's ``_clean --unused``),
then the layers nothing holds any more go as always (``drop_unheld``, ``reap``).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from ..sandbox import plan_ids, run_as_mapped_root
from . import catalog as cat
from .disk import tree_size
from .store import LayerStore


@dataclass(frozen=True)
class CachedStep:
    config: str
    number: int | None
    text: str
    key: str
    layer: str
    size: int            # bytes of its own layer; 0 for a step that changed nothing
    used: float
    needed: bool


def needed_layers(conn: sqlite3.Connection) -> set[str]:
    """Every layer in the chain of a reference of any config, or under a live use."""
    out: set[str] = set()
    tops = [r[0] for r in conn.execute("SELECT layer FROM refs")]
    for row in conn.execute("SELECT layers FROM mounts"):
        tops += row[0].split()
    for top in tops:
        if top not in out and conn.execute("SELECT 1 FROM layers WHERE id=?",
                                           (top,)).fetchone():
            out.update(cat.chain(conn, top))
    return out


def cached_steps(store: LayerStore) -> list[CachedStep]:
    """The cached steps of every config, by config and step number."""
    conn = store.db()
    with cat.transaction(conn):    # one consistent view, read only
        rows = list(conn.execute(
            "SELECT config, number, text, key, layer, changed, COALESCE(used, created, 0) "
            "FROM steps ORDER BY config, number, used"))
        needed = needed_layers(conn)
    sizes = _sizes(store, {r[4] for r in rows if r[5] != 0})
    return [CachedStep(c, n, t or "?", k, layer, sizes.get(layer, 0) if ch != 0 else 0, u,
                       layer in needed) for c, n, t, k, layer, ch, u in rows]


def _sizes(store: LayerStore, layers: set[str]) -> dict[str, int]:
    """Bytes of each layer, read as root of the store's user namespace (a subordinate ID's
    dir may deny the user)."""
    paths = {x: store.layout.layer(x) for x in layers}
    return run_as_mapped_root(lambda: {x: tree_size(p) for x, p in paths.items()},
                              plan_ids("auto", store.owner))


def prune(store: LayerStore, older_than: float | None = None,
          max_size: int | None = None) -> dict[str, int]:
    """Remove unneeded cached steps: all of them, or those unused for ``older_than`` seconds,
    and then the least recently used until the rest take at most ``max_size`` bytes.  Counts
    of the steps removed and kept and the bytes the dropped layers held."""
    steps = cached_steps(store)
    spare = sorted((s for s in steps if not s.needed), key=lambda s: s.used)
    now = time.time()
    if older_than is None and max_size is None:
        doomed = spare
    else:
        doomed = [s for s in spare if older_than is not None and s.used < now - older_than]
        if max_size is not None:
            rest = [s for s in spare if s not in doomed]
            total = _total(rest)
            while rest and total > max_size:
                doomed.append(rest.pop(0))
                total = _total(rest)
    sizes = {s.layer: s.size for s in steps if s.size}
    with store.txn() as conn:
        keep = needed_layers(conn)   # anything made needed since the listing stays
        gone = [s for s in doomed if s.layer not in keep]
        conn.executemany("DELETE FROM steps WHERE config=? AND key=?",
                         [(s.config, s.key) for s in gone])
        dropped = cat.drop_unheld(conn)
    store.reap()
    return {"removed": len(gone), "kept": len(steps) - len(gone),
            "freed": sum(sizes.get(x, 0) for x in dropped)}


def _total(steps: list[CachedStep]) -> int:
    return sum({s.layer: s.size for s in steps}.values())
