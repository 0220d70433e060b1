"""A config of a store: mock's snapshot operations, mounts and runs on its layers.

References (see ``catalog``): ``.base`` is the first layer, ``.current`` what ``clean`` returns
to, ``.upper`` where writes go.  A snapshot freezes the upper (``.current`` moves to it); only
the next mount or run allocates a fresh child, so snapshots with nothing in between share one
layer.  Every operation is one transaction, then the disk follows (``LayerStore.reap``).
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

from ..backends import Mount
from ..backends.choose import choose
from ..backends.kernel import umount_retrying
from ..errors import OverlayfuseError
from ..probe import signals_unwind, unmount_fuse
from ..sandbox import Bind, CommandError, plan_ids, run_as_mapped_root
from ..sandbox.rootfs import check_tree_path
from ..spec import OverlaySpec
from .. import sysmount
from ..sysmount.fsinfo import is_mountpoint
from ..validate import validate_mountpoint
from . import catalog as cat
from .copytree import copy_tree
from .disk import TmpEntry, as_owner, make_layer_root, tree_size
from .image import Access, Transfer, import_image
from .progress import Progress
from .tarimport import import_tar
from .rooted import Network, OverlayVolume, root_shell, run_rooted, shell_error, tree_cwd
from .store import LayerStore, MountRow, check_name
from .live import control_path, freeze, holders, live_writer, prepare_run_dir, replace
from .use import take

POSTINIT = "postinit"


class Config:
    """``LayerStore(base).config(name)``: snapshots, rollbacks, mounts and runs of one config
    (``api.Config`` adds ``build`` on top)."""

    def __init__(self, store: LayerStore, name: str) -> None:
        self.store = store
        self.name = name

    def __repr__(self) -> str:
        return f"<Config {self.name} in {self.store.base}>"

    def exists(self) -> bool:
        return self.store.exists() and cat.config_exists(self.store.db(), self.name)

    def _require(self, conn: sqlite3.Connection) -> None:
        if not cat.config_exists(conn, self.name):
            raise OverlayfuseError(f"no config {self.name!r} in the store {self.store.base} "
                                   "(overlayfuse store init makes one)")

    # -- creation -----------------------------------------------------------------------------

    def init(self, from_dir: str | None = None, from_config: str | None = None,
             progress: Progress | None = None, from_tar: str | None = None) -> list[str]:
        """Create the config: a copy of ``from_dir``, the contents of the root filesystem
        tarball ``from_tar``, the layers of another config's snapshot (``OTHER[:SNAPSHOT]``,
        shared), or empty; then take the snapshot ``postinit``.  Returns lines to show the
        user (what an import skipped, the IDs it could not keep)."""
        if sum(x is not None for x in (from_dir, from_config, from_tar)) > 1:
            raise OverlayfuseError("init takes one of --from, --from-tar and --from-config")
        store = self.store
        if from_tar is not None:
            from_tar = os.path.abspath(from_tar)
            if not os.path.isfile(from_tar):
                raise OverlayfuseError(f"--from-tar {from_tar}: not a file")
        if from_dir is not None:
            from_dir = os.path.realpath(from_dir)
            if not os.path.isdir(from_dir):
                raise OverlayfuseError(f"--from {from_dir}: not a directory")
            if from_dir == store.base or from_dir.startswith(store.base + os.sep):
                raise OverlayfuseError(f"--from {from_dir} is inside the store")
        other = snap = None
        if from_config is not None:
            other, _, snap = from_config.partition(":")
            check_name(other, "config")
            if snap:
                check_name(snap, "snapshot")
        conn = store.db(create=True)
        self._refuse_existing(conn)
        if other is not None:
            with store.txn() as conn:
                self._refuse_existing(conn)
                if not cat.config_exists(conn, other):
                    raise OverlayfuseError(f"no config {other!r} to start from")
                layer = cat.ref(conn, other, snap or cat.CURRENT)
                if layer is None:
                    raise OverlayfuseError(f"no snapshot {snap!r} in config {other!r}")
                self._create_rows(conn, f"config {other}:{snap or '(current)'}", layer)
            return []
        notes: list[str] = []
        origin = "empty"
        with TmpEntry(store.layout, "init-" + os.urandom(6).hex()) as tmp:
            layer_dir = os.path.join(tmp.path, "layer")
            make_layer_root(layer_dir, None, store.owner)
            if from_dir is not None:
                copy_tree(from_dir, layer_dir, progress or Progress(f"copying {from_dir}"))
                origin = f"dir {from_dir}"
            if from_tar is not None:
                notes = _import_tar(from_tar, layer_dir, store.owner,
                                    progress or Progress(f"unpacking {from_tar}"))
                origin = f"tar {from_tar}"
            layer = cat.new_layer_id()
            with store.txn() as conn:
                self._refuse_existing(conn)
                cat.add_layer(conn, layer, None)
                self._create_rows(conn, origin, layer)
                # a tree whose root a subordinate ID owns, or that denies its owner writes,
                # moves to another parent only as its owner in the user's namespace
                dest = store.layout.layer(layer)
                as_owner(lambda: os.rename(layer_dir, dest))
        return notes

    def _refuse_existing(self, conn: sqlite3.Connection) -> None:
        if cat.config_exists(conn, self.name):
            raise OverlayfuseError(f"config {self.name!r} exists already in {self.store.base}")

    def _create_rows(self, conn: sqlite3.Connection, origin: str, layer: str) -> None:
        conn.execute("INSERT INTO configs(name, origin, created) VALUES (?, ?, ?)",
                     (self.name, origin, time.time()))
        for ref in (cat.BASE, cat.CURRENT, cat.UPPER, POSTINIT):
            cat.set_ref(conn, self.name, ref, layer)

    # -- from an OCI image (store init --from-image) ------------------------------------------

    def init_image(self, src: str, access: Access = Access(),
                   progress: Progress | None = None) -> Transfer:
        """Create the config from the image ``src`` (containers-transports syntax): its
        layers, in order, shared with the store's layers of the same chain ID; snapshot
        ``postinit``.  Nothing is left behind when any check fails."""
        conn = self.store.db(create=True)
        self._refuse_existing(conn)

        def hold(conn: sqlite3.Connection, top: str) -> None:
            self._refuse_existing(conn)
            self._create_rows(conn, f"image {src}", top)
        return import_image(self.store, src, hold, access=access, progress=progress)

    @property
    def origin(self) -> str:
        row = self.store.db().execute("SELECT origin FROM configs WHERE name=?",
                                      (self.name,)).fetchone()
        return row[0] if row else ""

    # -- snapshots ----------------------------------------------------------------------------

    def _busy_upper(self, conn: sqlite3.Connection, doing: str) -> str:
        """The upper layer, or an error when a writable mount or run holds it."""
        self._require(conn)
        upper = cat.ref(conn, self.name, cat.UPPER)
        assert upper is not None
        why = self.store.writer_of(conn, upper)
        if why:
            raise OverlayfuseError(f"cannot {doing}: config {self.name!r} is {why}")
        return upper

    @contextmanager
    def remounted(self, row: MountRow, doing: str) -> Iterator[None]:
        """The kernel cannot swap an overlay's layers: unmount when nothing holds the mount,
        let the operation run, mount again at the same path (also when it failed)."""
        mnt = row.mountpoint
        busy = holders(mnt)
        if not busy:
            try:
                sysmount.umount2(mnt)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise OverlayfuseError(f"cannot {doing}: unmounting {mnt}: "
                                           f"{e.strerror}") from None
                busy = holders(mnt) or [(0, "a mount below it, or a process just gone")]
        if busy:
            who = ", ".join(f"pid {pid} ({cmd})" if pid else cmd for pid, cmd in busy)
            raise OverlayfuseError(f"cannot {doing}: config {self.name!r} is mounted at {mnt} "
                                   f"by the kernel, which cannot switch layers under a mount, "
                                   f"and it is in use by {who}")
        with self.store.txn() as conn:
            conn.execute("DELETE FROM mounts WHERE mountpoint=?", (mnt,))
        try:
            yield
        finally:
            self.mount(mnt, "kernel")

    def snapshot(self, name: str, force: bool = False) -> "Snapshot":
        """Freeze the current upper as ``name``; it becomes the current state.  An existing
        ``name`` is refused, or moved with ``force`` (as ``build --tag``)."""
        check_name(name, "snapshot")
        row = live_writer(self.store, self.name)
        if row is not None and row.backend == "fuse":
            # the mount stays: its daemon freezes the upper and goes on with a fresh one
            freeze(self.store, self.name, row, name, force)
            self.store.reap()
            return Snapshot(self, name)
        if row is not None and row.backend == "kernel":
            with self.remounted(row, f"snapshot {name}"):
                return self.snapshot(name, force)
        with self.store.txn() as conn:
            upper = self._busy_upper(conn, f"snapshot {name}")
            if cat.ref(conn, self.name, name) is not None and not force:
                raise OverlayfuseError(f"snapshot {name!r} exists already in config "
                                       f"{self.name!r} (--force moves it)")
            cat.set_ref(conn, self.name, name, upper)
            cat.set_ref(conn, self.name, cat.CURRENT, upper)
            cat.drop_unheld(conn)
        self.store.reap()
        return Snapshot(self, name)

    def rollback(self, name: str) -> None:
        """Make snapshot ``name`` the current state; unsaved changes are dropped."""
        check_name(name, "snapshot")
        row = live_writer(self.store, self.name)
        if row is not None and row.backend == "fuse":
            replace(self.store, self.name, row, name)  # the mount shows the snapshot now
            self.store.reap()
            return
        if row is not None and row.backend == "kernel":
            with self.remounted(row, f"roll back to {name}"):
                return self.rollback(name)
        with self.store.txn() as conn:
            self._busy_upper(conn, f"roll back to {name}")
            layer = cat.ref(conn, self.name, name)
            if layer is None:
                raise OverlayfuseError(f"no snapshot {name!r} in config {self.name!r}")
            cat.set_ref(conn, self.name, cat.CURRENT, layer)
            cat.set_ref(conn, self.name, cat.UPPER, layer)
            cat.drop_unheld(conn)
        self.store.reap()

    def clean(self) -> None:
        """Drop the changes made since the current snapshot."""
        row = live_writer(self.store, self.name)
        if row is not None and row.backend == "fuse":
            replace(self.store, self.name, row, cat.CURRENT)
            self.store.reap()
            return
        if row is not None and row.backend == "kernel":
            with self.remounted(row, "clean"):
                return self.clean()
        with self.store.txn() as conn:
            self._busy_upper(conn, "clean")
            current = cat.ref(conn, self.name, cat.CURRENT)
            assert current is not None
            cat.set_ref(conn, self.name, cat.UPPER, current)
            cat.drop_unheld(conn)
        self.store.reap()

    def remove_snapshot(self, name: str) -> None:
        """Forget ``name``; its layer stays while anything else holds it."""
        check_name(name, "snapshot")
        with self.store.txn() as conn:
            self._require(conn)
            if cat.ref(conn, self.name, name) is None:
                raise OverlayfuseError(f"no snapshot {name!r} in config {self.name!r}")
            cat.drop_ref(conn, self.name, name)
            cat.drop_unheld(conn)
        self.store.reap()

    def snapshots(self) -> list["Snapshot"]:
        """The snapshots, oldest first; ``.current`` says which are the current state."""
        conn = self.store.db()
        self._require(conn)
        current = cat.ref(conn, self.name, cat.CURRENT)
        return [Snapshot(self, n, layer == current) for n, layer in
                cat.snapshots(conn, self.name)]

    def scrub(self, progress: Progress | None = None) -> None:
        """Remove everything of this config; layers other configs stand on stay."""
        with self.store.txn() as conn:
            self._require(conn)
            busy = self.store.mount_rows(conn, self.name)
            if busy:
                raise OverlayfuseError(f"cannot scrub: config {self.name!r} is "
                                       f"{busy[0].describe()}")
            for table in ("refs", "steps", "mounts", "failed"):
                conn.execute(f"DELETE FROM {table} WHERE config=?", (self.name,))
            conn.execute("DELETE FROM configs WHERE name=?", (self.name,))
            cat.drop_unheld(conn)
        self.store.reap(progress or Progress(f"scrubbing {self.name}"))

    # -- what it is made of -------------------------------------------------------------------

    def refs(self) -> dict[str, str]:
        """Every reference of the config (specials included): name -> layer id."""
        conn = self.store.db()
        return dict(conn.execute("SELECT name, layer FROM refs WHERE config=?", (self.name,)))

    def info(self) -> dict[str, object]:
        """Layers (upper first) with parents, sizes, holders; which backend can mount it."""
        conn = self.store.db()
        self._require(conn)
        upper = cat.ref(conn, self.name, cat.UPPER)
        assert upper is not None
        seen: list[str] = []
        tops = [upper] + [layer for _, layer in conn.execute(
            "SELECT name, layer FROM refs WHERE config=? UNION ALL "
            "SELECT key, layer FROM steps WHERE config=?", (self.name, self.name))]
        for top in tops:
            for layer in cat.chain(conn, top):
                if layer not in seen:
                    seen.append(layer)
        layers = [{"id": x, "parent": cat.parent_of(conn, x),
                   "size": tree_size(self.store.layout.layer(x)),
                   "held_by": cat.holders(conn, x)} for x in seen]
        # the spec a writable mount would get (the probe runs beside the upper)
        lowers = cat.chain(conn, cat.ref(conn, self.name, cat.CURRENT) or upper)
        layout = self.store.layout
        spec = OverlaySpec(lowerdirs=tuple(layout.layer(x) for x in lowers),
                           upperdir=layout.layer(upper), workdir=layout.work(upper),
                           options=self.store.options)
        backends = {}
        for purpose in ("mount", "run"):
            try:
                _chosen, why = choose(spec, purpose, "auto")  # type: ignore[arg-type]
            except OverlayfuseError as e:
                why = f"none: {e}"
            backends[purpose] = why
        return {"config": self.name, "origin": self.origin, "namespace": self.store.namespace,
                "layers": layers, "backends": backends,
                "uses": [r.describe() for r in self.store.mount_rows(conn, self.name)]}

    # -- using it -----------------------------------------------------------------------------

    def mount(self, target: str, backend: str = "auto", *, snapshot: str | None = None,
              verbose: bool = False) -> Mount:
        """Mount the current state writable on ``target`` (a snapshot: read-only); the handle
        unmounts. The layers stay locked for as long as the mount lives, in any process."""
        target = os.path.realpath(target)
        conn = self.store.db()
        dead = conn.execute("SELECT backend FROM mounts WHERE mountpoint=?", (target,)).fetchone()
        if dead is not None and dead[0] == "fuse" and is_mountpoint(target) and \
                not any(r.mountpoint == target for r in self.store.mount_rows(conn)):
            # a mount of ours whose daemon was killed: taken down first (as store umount)
            unmount_recorded(self.store, target)
        use = take(self.store, self.name, mode="readonly" if snapshot else "upper", row=target,
                   snapshot=snapshot)
        try:
            validate_mountpoint(use.spec, target)
            chosen, why = choose(use.spec, "mount", backend)
            if verbose:
                print(f"overlayfuse: {why}", file=sys.stderr)
            if chosen.name == "kernel":
                # recorded first: once mounted, nothing but this row holds the layers
                use.record(chosen.name, None)
            if chosen.name == "fuse" and not snapshot:
                # a writable FUSE mount takes snapshots without unmounting (live.py)
                prepare_run_dir(self.store)
                control = (control_path(self.store, target),
                           dict(zip(use.layers, use.locks.fds)))
                inner = chosen.mount(use.spec, target, control=control)  # type: ignore
            else:
                inner = chosen.mount(use.spec, target)
            use.record(chosen.name, inner.pid)
        except BaseException:
            use.release()
            raise
        use.locks.release()  # the daemon holds its own copies; a kernel mount the row
        return Mount(inner.backend, target, use.spec,
                     lambda: self._unmount(inner, target), pid=inner.pid)

    def _unmount(self, inner: Mount, target: str) -> None:
        inner.unmount()
        with self.store.txn() as conn:
            conn.execute("DELETE FROM mounts WHERE mountpoint=?", (target,))
        self.store.reap()

    def run(self, argv: Sequence[str], *, writable: bool = False, snapshot: str | None = None,
            backend: str = "auto", cwd: str | None = None, env: dict[str, str] | None = None,
            binds: Sequence[Bind | str] = (), network: Network = "host",
            map_root: bool = False, verbose: bool = False,
            overlays: Sequence[OverlayVolume | str] = (), failed: bool = False) -> int:
        """Run ``argv`` with the current state as ``/`` (cwd ``/`` or ``cwd``): its changes
        stay in the config's upper, or vanish afterwards with ``writable`` (a throwaway upper;
        several may run at once).  A ``snapshot`` is shown read-only unless ``writable``.
        ``binds`` are host paths shown inside (``Bind`` or ``SRC[:DST[:ro]]``); ``overlays``
        host dirs shown writable, their changes thrown away (``OverlayVolume`` or
        ``SRC:DST``).  ``env`` None is a clean environment.  A normal user is root inside,
        with the subordinate ranges for the other IDs; ``map_root`` maps one ID only (root
        inside is the user).  ``failed`` runs in the partial result of the step that failed in
        the last build, with that step's environment, on a throwaway upper."""
        if failed:
            if snapshot is not None:
                raise OverlayfuseError("--failed and --snapshot do not go together")
            snapshot, writable = cat.FAILED, True
            term = {"TERM": os.environ["TERM"]} if "TERM" in os.environ else {}
            env = {**self.failed_step()[2], **term, **(env or {})}
        keep = snapshot is None and not writable
        binds = [b if isinstance(b, Bind) else Bind.parse(b) for b in binds]
        for bind in binds:  # before the layers are taken: bad input changes nothing
            bind.check()
        overlays = [v if isinstance(v, OverlayVolume) else OverlayVolume.parse(v)
                    for v in overlays]
        for vol in overlays:
            vol.check()
        check_tree_path(tree_cwd(cwd), f"working directory {cwd}")
        row = live_writer(self.store, self.name) if snapshot is None else None
        if row is not None and writable:
            # a throwaway upper on the mounted tree itself (the kernel's overlayfs takes a
            # FUSE mount, or its own, as a lower): the run sees what the mount shows
            with signals_unwind(), TmpEntry(self.store.layout,
                                            "run-" + os.urandom(6).hex()) as tmp:
                up, work = os.path.join(tmp.path, "upper"), os.path.join(tmp.path, "work")
                make_layer_root(up, row.mountpoint, self.store.owner)
                make_layer_root(work, None, self.store.owner)
                spec = OverlaySpec(lowerdirs=(row.mountpoint,), upperdir=up, workdir=work,
                                   options=self.store.options)
                return run_rooted(self.store, spec, argv, backend=backend, binds=binds,
                                  overlays=overlays, network=network, cwd=cwd, env=env,
                                  verbose=verbose, map_root=map_root)
        if row is not None and row.backend in ("fuse", "kernel"):
            # the config is mounted: the command runs in that very tree, seen there at once
            with signals_unwind():
                try:
                    return run_rooted(self.store, OverlaySpec(lowerdirs=(row.mountpoint,)),
                                      argv, backend=backend,
                                      binds=binds, overlays=overlays, network=network,
                                      cwd=cwd, env=env, keep_upper=True, verbose=verbose,
                                      map_root=map_root, live=row.mountpoint)
                finally:
                    self.store.reap()
        with signals_unwind():
            use = take(self.store, self.name, mode="upper" if keep else "throwaway",
                       snapshot=snapshot, row=f"run:{os.getpid()}:{os.urandom(4).hex()}")
            try:
                return run_rooted(self.store, use.spec, argv, backend=backend,
                                  binds=binds, overlays=overlays,
                                  network=network, cwd=cwd, env=env,
                                  readonly=snapshot is not None and not writable,
                                  keep_upper=keep, verbose=verbose, map_root=map_root)
            finally:
                use.release()
                self.store.reap()

    def failed_step(self) -> tuple[int, str, dict[str, str]]:
        """(number, text, environment) of the step that failed in the last build."""
        conn = self.store.db()
        self._require(conn)
        row = conn.execute("SELECT number, text, env FROM failed WHERE config=?",
                           (self.name,)).fetchone()
        if row is None or cat.ref(conn, self.name, cat.FAILED) is None:
            raise OverlayfuseError(f"config {self.name!r} has no failed build step (a build "
                                   "keeps the state of a step that failed until the next "
                                   "build)")
        return row[0], row[1], dict(json.loads(row[2]))

    def shell(self, **kwargs: object) -> int:
        """An interactive shell with the current state as ``/``: root's login shell in the
        tree's /etc/passwd, else /bin/sh (the options of ``run``); its exit status."""
        if kwargs.get("failed"):
            self.failed_step()   # a clear error before anything is taken
        snapshot = cat.FAILED if kwargs.get("failed") else kwargs.get("snapshot")
        row = None if snapshot else live_writer(self.store, self.name)
        if row is not None and row.backend in ("fuse", "kernel"):
            shell = root_shell(OverlaySpec(lowerdirs=(row.mountpoint,)))  # the live tree
        else:
            use = take(self.store, self.name, mode="readonly",
                       snapshot=snapshot)  # type: ignore[arg-type]
            try:
                shell = root_shell(use.spec)
            finally:
                use.release()
        try:
            return self.run([shell], **kwargs)  # type: ignore[arg-type]
        except CommandError as e:
            raise shell_error(e, shell) from None


def _import_tar(path: str, layer_dir: str, owner: tuple[int, int],
                progress: Progress) -> list[str]:
    """Unpack as the store's runs see IDs: a normal user as root of a user namespace with
    the subordinate ranges (owners kept as those IDs), root with the host's IDs."""
    plan = plan_ids("auto", owner)
    summary = run_as_mapped_root(
        lambda: import_tar(path, layer_dir, progress, chown=plan.mode != "single"), plan)
    notes = [summary.line(path)]
    if plan.mode == "single":
        notes.append(f"the archive's owners are not kept, every entry is uid {owner[0]}'s "
                     f"(0 in runs): {plan.note}")
    return notes


class Snapshot:
    """A named snapshot of a config: ``overlayfuse.mount(snap, mnt)`` shows it read-only,
    ``overlayfuse.run(snap, argv, writable=True)`` runs on a throwaway copy of it."""

    def __init__(self, config: Config, name: str, current: bool = False) -> None:
        self.config = config
        self.name = name
        self.current = current

    def __repr__(self) -> str:
        return f"<Snapshot {self.config.name}:{self.name}>"

    def mount(self, target: str, backend: str = "auto") -> Mount:
        return self.config.mount(target, backend, snapshot=self.name)

    def run(self, argv: Sequence[str], **kwargs: object) -> int:
        return self.config.run(argv, snapshot=self.name, **kwargs)  # type: ignore[arg-type]


def unmount_recorded(store: LayerStore, mountpoint: str) -> None:
    """``store umount``: take down a mount this store recorded, by its backend."""
    mnt = os.path.realpath(mountpoint)
    conn = store.db()
    live = [r for r in store.mount_rows(conn) if r.mountpoint == mnt]
    # a daemon that was killed leaves a dead FUSE mount behind: still ours to take down
    dead = conn.execute("SELECT backend, pid FROM mounts WHERE mountpoint=?", (mnt,)).fetchone()
    if live:
        backend, pid = live[0].backend, live[0].pid
    elif dead is not None and dead[0] == "fuse" and is_mountpoint(mnt):
        backend, pid = "fuse", None
    else:
        raise OverlayfuseError(f"{mnt} is not a mount of the store {store.base}")
    if backend == "kernel":
        try:
            umount_retrying(mnt)
        except OSError as e:
            raise OverlayfuseError(f"cannot unmount {mnt}: {e.strerror}") from None
    else:
        unmount_fuse(mnt, pid)
    with store.txn() as conn:
        conn.execute("DELETE FROM mounts WHERE mountpoint=?", (mnt,))
    store.reap()
