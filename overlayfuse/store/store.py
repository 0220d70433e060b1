"""LayerStore: one base directory, its catalog, and what no config holds any more.

The store decides ownership once, at creation: its owner is whoever owns the base, and its
layers use that owner's overlay xattr namespace (``trusted.overlay.*`` for root,
``user.overlay.*`` for a normal user, recorded in the catalog).  When root works on a user's
store, every spec carries ``userxattr``, so the kernel, FUSE and a user namespace all read the
same markers.
"""
from __future__ import annotations

import os
import re
import resource
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..errors import OverlayfuseError
from ..probe.scratch import remove_stale_scratch
from ..sysmount.fsinfo import is_mountpoint, mount_table
from . import catalog as cat
from .disk import (Layout, as_owner, remove_tmp_entries, remove_tree, stale_tmp_entries,
                   tree_size)
from .locks import is_locked
from .progress import Progress

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# what new_layer_id makes: anything else in layers/ or work/ is not ours to remove (the probe
# makes its scratch dirs beside the upper, i.e. in layers/)
LAYER_ID_RE = re.compile(r"[0-9a-f]{16}")


def check_name(name: str, what: str) -> str:
    """A config or snapshot name as the issue allows them, else a one-line error."""
    if not NAME_RE.fullmatch(name or ""):
        raise OverlayfuseError(f"invalid {what} name {name!r}: use letters, digits, '_', '-' "
                               "and '.' (not first)")
    return name


def default_base() -> str:
    """``$XDG_DATA_HOME/overlayfuse``, else ``~/.local/share/overlayfuse``."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(data, "overlayfuse")


@dataclass(frozen=True)
class MountRow:
    """A live use recorded in the catalog: a mount (kernel or FUSE) or a ``run``."""

    mountpoint: str
    config: str
    backend: str
    writable: bool
    pid: int | None
    layers: tuple[str, ...]

    def describe(self) -> str:
        if self.mountpoint.startswith("run:"):
            return f"in use by a run (pid {self.pid})"
        return f"mounted {'writable' if self.writable else 'read-only'} at {self.mountpoint}"


class LayerStore:
    """A base directory of layers shared by named configs: the catalog-level store (opening,
    who uses a layer, reap and gc).  ``api.LayerStore`` adds ``config(name)`` on top."""

    def __init__(self, base: str | None = None) -> None:
        self.base = os.path.realpath(base or default_base())
        self.layout = Layout(self.base)
        self._conn: sqlite3.Connection | None = None
        _raise_fd_limit()

    # -- opening ------------------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.exists(self.layout.db)

    def db(self, create: bool = False) -> sqlite3.Connection:
        """The catalog; ``create`` makes the store (owned by the base's owner) if missing."""
        if self._conn is not None:
            return self._conn
        if not self.exists():
            if not create:
                raise OverlayfuseError(f"no store at {self.base} (overlayfuse store init "
                                       "makes one)")
            self._create()
        try:
            self._conn = cat.connect(self.layout.db)
        except sqlite3.Error as e:
            raise OverlayfuseError(f"cannot open the store catalog {self.layout.db}: {e}") \
                from None
        return self._conn

    def _create(self) -> None:
        try:
            st = os.stat(self.base)
            owner = (st.st_uid, st.st_gid)
        except FileNotFoundError:
            owner = (os.geteuid(), os.getegid())
        try:
            self.layout.create(owner)
            conn = cat.connect(self.layout.db)
            with cat.transaction(conn):
                if cat.get_meta(conn, "namespace") is None:
                    cat.set_meta(conn, "version", cat.SCHEMA_VERSION)
                    cat.set_meta(conn, "owner", f"{owner[0]}:{owner[1]}")
                    cat.set_meta(conn, "namespace", "trusted" if owner[0] == 0 else "user")
            conn.close()
            if os.geteuid() == 0 and owner[0] != 0:
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(self.layout.db + suffix):
                        os.chown(self.layout.db + suffix, *owner)
        except OSError as e:
            raise OverlayfuseError(f"cannot create a store at {self.base}: "
                                   f"{e.strerror or e}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def txn(self) -> Iterator[sqlite3.Connection]:
        """One catalog transaction (BEGIN IMMEDIATE), sqlite failures as one-line errors."""
        conn = self.db()
        try:
            with cat.transaction(conn):
                yield conn
        except sqlite3.Error as e:
            raise OverlayfuseError(f"store catalog {self.layout.db}: {e}") from None

    @property
    def owner(self) -> tuple[int, int]:
        uid, gid = (cat.get_meta(self.db(), "owner") or "0:0").split(":")
        return int(uid), int(gid)

    @property
    def namespace(self) -> str:
        return cat.get_meta(self.db(), "namespace") or "trusted"

    @property
    def options(self) -> tuple[tuple[str, str | None], ...]:
        """Overlay options every spec of this store carries (``userxattr`` for a user's)."""
        return (("userxattr", None),) if self.namespace == "user" else ()

    def configs(self) -> list[dict[str, object]]:
        """Each config: name, its current snapshot names, the bytes its layers take."""
        conn = self.db()
        out = []
        for (name,) in conn.execute("SELECT name FROM configs ORDER BY name"):
            current = cat.ref(conn, name, cat.CURRENT)
            names = [n for n, layer in cat.snapshots(conn, name) if layer == current]
            layers: set[str] = set()
            for (layer,) in conn.execute("SELECT layer FROM refs WHERE config=? UNION "
                                         "SELECT layer FROM steps WHERE config=?", (name, name)):
                layers.update(cat.chain(conn, layer))
            size = sum(tree_size(self.layout.layer(x)) for x in layers)
            out.append({"name": name, "current": names, "size": size, "layers": len(layers)})
        return out

    # -- who uses a layer ---------------------------------------------------------------------

    def mount_rows(self, conn: sqlite3.Connection, config: str | None = None) -> list[MountRow]:
        """The recorded uses that are still alive (the dead ones are dropped by ``reap``)."""
        rows = conn.execute("SELECT mountpoint, config, backend, writable, pid, layers "
                            "FROM mounts" + (" WHERE config=?" if config else ""),
                            (config,) if config else ())
        out = [MountRow(m, c, b, bool(w), p, tuple(x.split())) for m, c, b, w, p, x in rows]
        table = None
        live = []
        for row in out:
            if row.backend == "kernel":
                table = table if table is not None else mount_table()
                if any(e.mountpoint == row.mountpoint and e.fstype == "overlay" for e in table):
                    live.append(row)
            elif row.pid is not None and os.path.isdir(f"/proc/{row.pid}") and row.layers and \
                    is_locked(self.layout.lock(row.layers[0])):
                live.append(row)
        return live

    def in_use(self, layer: str, rows: list[MountRow]) -> bool:
        """A live process holds the layer's lock, or a kernel mount stacks it."""
        if is_locked(self.layout.lock(layer)):
            return True
        return any(layer in r.layers for r in rows if r.backend == "kernel")

    def writer_of(self, conn: sqlite3.Connection, layer: str) -> str | None:
        """Why ``layer`` cannot change hands now (a writable mount or run), else None."""
        rows = self.mount_rows(conn)
        for r in rows:
            if r.writable and r.layers and r.layers[0] == layer:
                return r.describe()
        if is_locked(self.layout.lock(layer), exclusive_only=True):
            return "in use by another overlayfuse process"
        return None

    def reader_of(self, conn: sqlite3.Connection, layer: str) -> str | None:
        """Why ``layer`` may not be written now: someone stacks it as a lower."""
        rows = self.mount_rows(conn)
        for r in rows:
            if layer in r.layers[(1 if r.writable else 0):]:
                return r.describe()
        if is_locked(self.layout.lock(layer)):
            return "in use as a lower by a running command (run --writable or build)"
        return None

    # -- live switches (live.py) -------------------------------------------------------------

    def finish_switch(self, conn: sqlite3.Connection, config: str, forward: bool) -> None:
        """Close the switch recorded for ``config`` (live.py): ``forward`` the state after it,
        else the state before (the new upper dropped).  After a freeze the old upper is
        frozen (the snapshot, if one was asked, and ``.current``); after a replace (rollback,
        clean) the target is ``.current`` and the old upper is dropped.  The new upper is
        ``.upper`` either way, and the mount row lists its layers."""
        row = conn.execute("SELECT mountpoint, kind, snapshot, target, old, new FROM switches "
                           "WHERE config=?", (config,)).fetchone()
        if row is None:
            return
        mnt, kind, snap, target, old, new = row
        if forward:
            current = old if kind == "freeze" else target
            if snap:
                cat.set_ref(conn, config, snap, current)
            cat.set_ref(conn, config, cat.CURRENT, current)
            cat.set_ref(conn, config, cat.UPPER, new)
            conn.execute("UPDATE mounts SET layers=? WHERE mountpoint=? AND config=?",
                         (" ".join(cat.chain(conn, new)), mnt, config))
        cat.drop_ref(conn, config, cat.NEXT)
        conn.execute("DELETE FROM switches WHERE config=?", (config,))
        cat.drop_unheld(conn)

    def settle(self, conn: sqlite3.Connection) -> None:
        """Close the switches whose command was killed: the daemon holds the new upper's lock
        once it switched (then forward); a live daemon without it never switched (back); a
        dead daemon's old upper is complete as it is (forward: nothing is lost either way,
        and what it wrote after a switch is kept)."""
        rows = conn.execute("SELECT config, mountpoint, old, new, client FROM switches")
        for config, mnt, old, new, client in rows.fetchall():
            if is_locked(client):
                continue  # the command is still at it
            if is_locked(self.layout.lock(new)):
                forward = True
            else:
                pid = conn.execute("SELECT pid FROM mounts WHERE mountpoint=?",
                                   (mnt,)).fetchone()
                alive = pid is not None and pid[0] is not None and \
                    os.path.isdir(f"/proc/{pid[0]}") and is_locked(self.layout.lock(old))
                forward = not alive
            self.finish_switch(conn, config, forward)

    # -- removing what nothing holds ----------------------------------------------------------

    def reap(self, progress: Progress | None = None, errors: list[str] | None = None) -> int:
        """Remove the dirs of layers the catalog no longer has (and nobody uses), the work dirs
        of frozen layers and dead mount records: the disk side of every change.  How many
        dirs are really gone; why the others are not goes to ``errors``, else raises one
        OverlayfuseError (what could not go waits in tmp/ for ``gc``)."""
        progress = progress or Progress("reap", enabled=False)
        dead: list[str] = []
        failed: list[str] = []
        with self.txn() as conn:
            self.settle(conn)
            known = cat.layer_ids(conn)
            rows = self.mount_rows(conn)
            live = {r.mountpoint for r in rows}
            # a dead FUSE mount stays recorded until ``store umount`` takes it down
            conn.executemany("DELETE FROM mounts WHERE mountpoint=?",
                             [(m,) for m, b in conn.execute("SELECT mountpoint, backend "
                                                            "FROM mounts")
                              if m not in live and not (b == "fuse" and is_mountpoint(m))])
            uppers = {u for (u,) in conn.execute(
                "SELECT u.layer FROM refs u JOIN refs c ON u.config=c.config "
                "WHERE u.name=? AND c.name=? AND u.layer<>c.layer", (cat.UPPER, cat.CURRENT))}
            # the fresh upper a live switch is handing to its daemon (live.py)
            uppers |= {u for (u,) in conn.execute("SELECT layer FROM refs WHERE name=?",
                                                  (cat.NEXT,))}
            for kind in ("layers", "work"):
                for name in sorted(os.listdir(self.layout.sub(kind))):
                    if not LAYER_ID_RE.fullmatch(name):
                        continue
                    keep = name in (known if kind == "layers" else uppers)
                    if keep or self.in_use(name, rows):
                        continue
                    grave = os.path.join(self.layout.sub("tmp"), f"dead-{kind}-{name}-"
                                         f"{os.urandom(4).hex()}")
                    old = os.path.join(self.layout.sub(kind), name)
                    try:
                        # a dir moves to another parent only with write access to itself
                        as_owner(lambda: os.rename(old, grave))
                    except OSError as e:
                        failed.append(f"cannot remove {old}: {e.strerror or e}")
                        continue
                    dead.append(grave)
            # the sockets of daemons that are gone (a killed one leaves its socket)
            sockets = {self.layout.control(r.mountpoint) for r in rows}
            run = self.layout.sub("run")
            for name in os.listdir(run) if os.path.isdir(run) else ():
                path = os.path.join(run, name)
                if name.endswith(".sock") and path not in sockets:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
            for name in os.listdir(self.layout.sub("locks")):
                path = self.layout.lock(name)
                if name not in known and not is_locked(path):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
        gone = 0
        for i, grave in enumerate(dead):
            progress.update(f"removing {i + 1}/{len(dead)}")
            err = remove_tree(grave)
            if err:
                failed.append(err)
            else:
                gone += 1
        progress.done()
        if errors is not None:
            errors.extend(failed)
        elif failed:
            raise OverlayfuseError(_failures(failed))
        return gone

    def gc(self, progress: Progress | None = None) -> dict[str, int]:
        """Bring the store back to a consistent state after crashes: remove leftovers of
        killed processes and every layer nothing references; report what is wrong."""
        progress = progress or Progress("gc")
        with self.txn() as conn:
            dropped = len(cat.drop_unheld(conn))
        # a probe killed with its store command left its scratch dir beside the uppers
        remove_stale_scratch(self.layout.sub("layers"))
        errors: list[str] = []
        stale = stale_tmp_entries(self.layout)
        leftovers = remove_tmp_entries(self.layout, stale, progress, errors)
        removed = self.reap(progress, errors)
        conn = self.db()
        missing = [layer for layer in cat.layer_ids(conn)
                   if not os.path.isdir(self.layout.layer(layer))]
        progress.done()
        if errors:
            raise OverlayfuseError(f"gc removed {removed} dirs and {leftovers} leftovers, "
                                   f"but {_failures(errors)}")
        return {"layers": len(cat.layer_ids(conn)), "dropped": dropped, "removed": removed,
                "leftovers": leftovers, "missing": len(missing)}


def _failures(errors: list[str]) -> str:
    """Removal failures as one line: the first, and how many more."""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return errors[0] + more


def _raise_fd_limit() -> None:
    """A use locks every layer of its chain (up to 500): allow the fds it needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        new = hard if hard == resource.RLIM_INFINITY else min(hard, 4096)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
