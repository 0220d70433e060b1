"""The catalog: a store's layers, references and mounts in SQLite, one transaction per change.

What holds a layer is never counted in a field that could drift: a layer lives while a row
references it (a snapshot or special reference in ``refs``, a cached build step in ``steps``,
a child in ``layers.parent``), and :func:`drop_unheld` deletes, in the same transaction, every
layer row that nothing holds any more (a child's parent goes with it when it was the last).
Directories on disk follow the catalog, never the other way round (see ``disk.py``).
"""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator

SCHEMA_VERSION = "1"

# special references of a config; snapshot names cannot start with a dot.  ``.failed`` holds
# the partial result of the step that failed in the config's last build (``failed`` says which)
UPPER, CURRENT, BASE, FAILED = ".upper", ".current", ".base", ".failed"
# the fresh upper a live mount is being switched to (see ``switches``), held while it is
NEXT = ".next"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    parent TEXT REFERENCES layers(id),
    created REAL NOT NULL,
    content TEXT
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS configs (
    name TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    config TEXT NOT NULL REFERENCES configs(name),
    name TEXT NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    created REAL NOT NULL,
    PRIMARY KEY (config, name)
);
CREATE INDEX IF NOT EXISTS refs_layer ON refs(layer);
CREATE TABLE IF NOT EXISTS steps (
    config TEXT NOT NULL REFERENCES configs(name),
    key TEXT NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    seconds REAL NOT NULL DEFAULT 0,
    number INTEGER,
    text TEXT,
    changed INTEGER,
    created REAL,
    used REAL,
    PRIMARY KEY (config, key)
);
CREATE INDEX IF NOT EXISTS steps_key ON steps(key);
CREATE TABLE IF NOT EXISTS failed (
    config TEXT PRIMARY KEY REFERENCES configs(name),
    number INTEGER NOT NULL,
    text TEXT NOT NULL,
    env TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS switches (
    config TEXT PRIMARY KEY REFERENCES configs(name),
    mountpoint TEXT NOT NULL,
    kind TEXT NOT NULL,
    snapshot TEXT,
    target TEXT,
    old TEXT NOT NULL,
    new TEXT NOT NULL,
    client TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mounts (
    mountpoint TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    backend TEXT NOT NULL,
    writable INTEGER NOT NULL,
    pid INTEGER,
    layers TEXT NOT NULL
);
"""


def connect(path: str) -> sqlite3.Connection:
    """Open (and create) the catalog; autocommit mode, so :func:`transaction` owns BEGIN."""
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    _add_columns(conn)
    return conn


# columns added since the first stores: added to an older catalog when it is opened
ADDED_COLUMNS = {"layers": ("content TEXT",),
                 "steps": ("number INTEGER", "text TEXT", "changed INTEGER", "created REAL",
                           "used REAL")}


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                try:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):  # another process was quicker
                        raise


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE .. COMMIT: writers queue up front, so a check and the change it guards
    happen under one write lock; any exception rolls everything back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


def new_layer_id() -> str:
    """A fresh layer id: random, so no counter needs a write lock before the dir exists."""
    return os.urandom(8).hex()


def add_layer(conn: sqlite3.Connection, layer: str, parent: str | None) -> None:
    conn.execute("INSERT INTO layers(id, parent, created) VALUES (?, ?, ?)",
                 (layer, parent, time.time()))


def parent_of(conn: sqlite3.Connection, layer: str) -> str | None:
    row = conn.execute("SELECT parent FROM layers WHERE id=?", (layer,)).fetchone()
    return row[0] if row else None


def chain(conn: sqlite3.Connection, layer: str) -> list[str]:
    """``layer`` and its ancestors, topmost first: the lowers of a mount on top of it."""
    out = [layer]
    while True:
        parent = parent_of(conn, out[-1])
        if parent is None:
            return out
        out.append(parent)


def ref(conn: sqlite3.Connection, config: str, name: str) -> str | None:
    row = conn.execute("SELECT layer FROM refs WHERE config=? AND name=?",
                       (config, name)).fetchone()
    return row[0] if row else None


def set_ref(conn: sqlite3.Connection, config: str, name: str, layer: str) -> None:
    conn.execute("INSERT OR REPLACE INTO refs(config, name, layer, created) VALUES (?, ?, ?, ?)",
                 (config, name, layer, time.time()))


def drop_ref(conn: sqlite3.Connection, config: str, name: str) -> None:
    conn.execute("DELETE FROM refs WHERE config=? AND name=?", (config, name))


def holders(conn: sqlite3.Connection, layer: str) -> list[str]:
    """Who holds ``layer``, in words: ``config:name`` refs, build steps, child layers."""
    out = [f"{c}:{n}" for c, n in conn.execute(
        "SELECT config, name FROM refs WHERE layer=? ORDER BY config, name", (layer,))]
    out += [f"{c}:build step {n or '?'}" for c, n in conn.execute(
        "SELECT config, number FROM steps WHERE layer=? ORDER BY config, number", (layer,))]
    out += [f"child {c}" for (c,) in conn.execute(
        "SELECT id FROM layers WHERE parent=? ORDER BY id", (layer,))]
    return out


def drop_unheld(conn: sqlite3.Connection) -> list[str]:
    """Delete every layer row nothing holds, repeatedly (a parent may lose its last child)."""
    dropped: list[str] = []
    while True:
        rows = [r[0] for r in conn.execute(
            "SELECT id FROM layers WHERE id NOT IN (SELECT layer FROM refs)"
            " AND id NOT IN (SELECT layer FROM steps)"
            " AND id NOT IN (SELECT parent FROM layers WHERE parent IS NOT NULL)")]
        if not rows:
            return dropped
        conn.executemany("DELETE FROM layers WHERE id=?", [(r,) for r in rows])
        dropped += rows


def layer_ids(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT id FROM layers")}


def config_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM configs WHERE name=?", (name,)).fetchone() is not None


def snapshots(conn: sqlite3.Connection, config: str) -> list[tuple[str, str]]:
    """(name, layer) of the config's snapshots, oldest first."""
    return list(conn.execute(
        "SELECT name, layer FROM refs WHERE config=? AND name NOT LIKE '.%'"
        " ORDER BY created, name", (config,)))
