"""``overlayfuse build``: a step file run step by step, each step's result cached as a layer.

vagga's ``--cache-each-step``: a step runs on the merged tree of the step before it (``rooted``:
its own namespaces, the tree as ``/``, cwd ``/``) and its upper is kept as a layer under a key,
so a rerun reuses every unchanged step and starts at the first changed one.

The key covers what the step sees (``stepkey``): the key before it, its text, the environment
it runs with (fixed, plus ``ENV`` and ``--env``: never the caller's), and for a ``COPY`` what it
copies.  The first key starts from the content identity of the base (``identity``), never from
a layer id, so two stores building the same steps on the same base agree on every key, a step
cached by any config of the store is reused, and a base snapshot that moved invalidates the
build.  A failing step keeps its partial result (``.failed``) until the next build of the
config, for ``store shell --failed``; the steps before it stay cached.  The result becomes the
config's current state (and, with ``--tag``, a snapshot).  A step that changes nothing keeps its
parent's layer, so no empty layers pile up.  Whatever a step leaves running dies with it (its
PID namespace), so nothing writes a layer once it is frozen.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from contextlib import nullcontext
from typing import Mapping, Sequence

from ..errors import OverlayfuseError
from ..sandbox import Bind
from . import catalog as cat
from .config import Config
from .disk import as_owner, is_empty_dir
from .identity import chain_identity
from .live import live_writer
from .live import replace as live_replace
from .remotecache import RemoteCache
from .rooted import Network, run_rooted
from .stepcopy import copy_digest, copy_step
from .stepfile import ENV_NAME, Step, read_steps
from .stepkey import base_key, step_key
from .store import LayerStore, check_name
from .use import take


def _say(text: str) -> None:
    print(f"overlayfuse build: {text}", file=sys.stderr, flush=True)


def build(config: Config, stepfile: str, *, from_dir: str | None = None,
          from_config: str | None = None, from_tar: str | None = None, tag: str | None = None,
          force: bool = False, no_cache: bool = False, backend: str = "auto",
          binds: Sequence[Bind] = (), network: Network = "host",
          env: Mapping[str, str] | None = None, remote: RemoteCache | None = None) -> int:
    """Build ``config`` from ``stepfile``: 0, or the exit status of the step that failed.
    Each step sees the tree as ``/``, plus ``binds`` (host paths) and the ``network``; ``env``
    (``--env``) is set for every step.  ``tag`` names the result as a snapshot; an existing
    one is refused unless ``force``, as ``snapshot`` does.  ``remote`` is a registry's cache
    of steps to take from and give to (``--cache-from``, ``--cache-to``)."""
    if tag is not None:
        check_name(tag, "snapshot")
    for name in env or {}:
        if not ENV_NAME.match(name):
            raise OverlayfuseError(f"--env {name}: not a variable name")
    # everything about the input is checked before anything is built
    steps = read_steps(stepfile, dict(env or {}))
    copies = {s.number: copy_digest(s.sources, s.dest, f"{stepfile}:{s.line}")
              for s in steps if s.kind == "copy"}
    store = config.store
    if not config.exists():
        for line in config.init(from_dir=from_dir, from_config=from_config, from_tar=from_tar):
            _say(line)
    else:
        _check_origin(config, from_dir, from_config, from_tar)
    with store.txn() as conn:
        config._require(conn)
        if tag is not None and not force and cat.ref(conn, config.name, tag) is not None:
            raise OverlayfuseError(f"snapshot {tag!r} exists already in config {config.name!r} "
                                   "(--force moves it to the result)")
        # the last build's failed state goes with the next build
        cat.drop_ref(conn, config.name, cat.FAILED)
        conn.execute("DELETE FROM failed WHERE config=?", (config.name,))
        cat.drop_unheld(conn)
    store.reap()
    conn = store.db()
    base, moved = _base_layer(config, conn)
    if moved:
        _say(f"the base {config.origin[len('config '):]} moved: building on its new state")
    key = base_key(chain_identity(conn, store.layout, base, store.owner))
    layer, ran, cached, pulled = base, 0, 0, 0
    remote = remote or RemoteCache(None, None)
    how = dict(backend=backend, binds=tuple(binds), network=network)
    for step in steps:
        key = step_key(key, step, copies.get(step.number, ""))
        label = f"[{step.number}/{len(steps)}]"
        hit = None if no_cache else _cached(config, key, step)
        if hit is not None:
            layer, seconds = hit
            cached += 1
            _say(f"{label} cached  {key[:12]}  (ran in {seconds:.1f} s)  {step.text}")
            _give(remote, store, layer, key)
            continue
        started = time.monotonic()
        took_from = None if no_cache else _pulled(config, remote, key, step, layer)
        if took_from is not None:
            layer = took_from
            pulled += 1
            _say(f"{label} pulled  {key[:12]}  in {time.monotonic() - started:.1f} s  "
                 f"{step.text}")
            continue
        _say(f"{label} running {key[:12]}  {step.text}")
        status, layer = _run_step(config, layer, key, step, no_cache, how)
        took = time.monotonic() - started
        if status != 0:
            _say(f"{label} failed with exit status {status} after {took:.1f} s: {step.text}")
            _say(f"its partial result is kept until the next build: overlayfuse store "
                 f"--base {store.base} --config {config.name} shell --failed")
            return status
        ran += 1
        _say(f"{label} ran     {key[:12]}  in {took:.1f} s")
        _give(remote, store, layer, key)
    row = live_writer(store, config.name)
    # a kernel mount cannot switch layers: unmounted and mounted again when idle
    remount = config.remounted(row, "set the build result") \
        if row is not None and row.backend == "kernel" else nullcontext()
    with remount:
        with store.txn() as conn:
            if row is None or row.backend != "fuse":
                config._busy_upper(conn, "set the build result")
            if tag is not None and not force and cat.ref(conn, config.name, tag) is not None:
                raise OverlayfuseError(f"snapshot {tag!r} was made in config {config.name!r} "
                                       "while building (--force moves it to the result)")
            if row is None or row.backend != "fuse":
                cat.set_ref(conn, config.name, cat.CURRENT, layer)
                cat.set_ref(conn, config.name, cat.UPPER, layer)
            if moved:
                cat.set_ref(conn, config.name, cat.BASE, base)
            if tag is not None:
                cat.set_ref(conn, config.name, tag, layer)
            cat.drop_unheld(conn)
    if row is not None and row.backend == "fuse":
        # the config is mounted: the mount switches to the result, as a rollback to it
        # (the steps ran in their own layers: what they key must not hold the IDE's edits)
        live_replace(store, config.name, row, None, layer)
    store.reap()
    _say(f"built {config.name}: {len(steps)} steps, {ran} ran, {cached} cached"
         + (f", {pulled} pulled" if remote.cache_from else "") + f"; key {key}"
         + (f"; tagged {tag}" if tag else ""))
    return 0


def _check_origin(config: Config, from_dir: str | None, from_config: str | None,
                  from_tar: str | None) -> None:
    if from_dir is not None:
        asked = f"dir {os.path.realpath(from_dir)}"
    elif from_tar is not None:
        asked = f"tar {os.path.abspath(from_tar)}"
    elif from_config is not None:
        other, _, snap = from_config.partition(":")
        asked = f"config {other}:{snap or '(current)'}"
    else:
        return
    if asked != config.origin:
        raise OverlayfuseError(f"config {config.name!r} exists and was made from "
                               f"{config.origin}, not {asked} (scrub it to start over)")


def _base_layer(config: Config, conn: sqlite3.Connection) -> tuple[str, bool]:
    """The layer the first step stands on, and whether it moved: a config made from another
    config's snapshot follows that snapshot (or that config's current state) where it is now;
    a dir or a tarball was read once, when the config was made."""
    base = cat.ref(conn, config.name, cat.BASE)
    assert base is not None
    origin = config.origin
    if not origin.startswith("config "):
        return base, False
    other, _, snap = origin[len("config "):].partition(":")
    now = cat.ref(conn, other, cat.CURRENT if snap == "(current)" else snap)
    if now is None:
        _say(f"the base {other}:{snap} is gone: building on the state it had when config "
             f"{config.name!r} was made")
        return base, False
    return now, now != base


def _cached(config: Config, key: str, step: Step) -> tuple[str, float] | None:
    """The layer a step with ``key`` left in any config of the store, now also held by this
    config's row (in one transaction, so nothing drops it in between), and how long it ran."""
    with config.store.txn() as conn:
        row = _step_row(conn, config.name, key)
        if row is None:
            return None
        _record(conn, config.name, key, step, *row)
    return row[0], row[1]


def _step_row(conn: sqlite3.Connection, config: str, key: str
              ) -> tuple[str, float, int | None] | None:
    """(layer, seconds, changed) of a step keyed ``key`` in any config, this one's first."""
    return conn.execute("SELECT layer, seconds, changed FROM steps WHERE key=? "
                        "ORDER BY config=? DESC, used DESC LIMIT 1", (key, config)).fetchone()


def _pulled(config: Config, remote: RemoteCache, key: str, step: Step,
            parent: str) -> str | None:
    """The step's layer from ``--cache-from``, recorded as this config's cached step."""
    def hold(conn: sqlite3.Connection, top: str) -> None:
        _record(conn, config.name, key, step, top, 0.0, int(top != parent))
    return remote.take(config.store, key, hold)


def _give(remote: RemoteCache, store: LayerStore, layer: str, key: str) -> None:
    started = time.monotonic()
    if remote.give(store, layer, key):
        _say(f"      pushed  {key[:12]}  to {remote.cache_to} in "
             f"{time.monotonic() - started:.1f} s")


def _record(conn: sqlite3.Connection, config: str, key: str, step: Step, layer: str,
            seconds: float, changed: int | None) -> None:
    now = time.time()
    old = conn.execute("SELECT created FROM steps WHERE config=? AND key=?",
                       (config, key)).fetchone()
    conn.execute("INSERT OR REPLACE INTO steps(config, key, layer, seconds, number, text, "
                 "changed, created, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (config, key, layer, seconds, step.number, step.text, changed,
                  old[0] if old and old[0] else now, now))


def _run_step(config: Config, parent: str, key: str, step: Step, no_cache: bool,
              how: dict[str, object]) -> tuple[int, str]:
    """Run one step on top of ``parent``: (exit status, the layer holding its result).  A
    failed step's partial result becomes the config's ``.failed`` state."""
    store = config.store
    use = take(store, config.name, mode="throwaway", top=parent)
    started = time.monotonic()
    try:
        assert use.tmp is not None and use.spec.upperdir is not None
        env = dict(step.env)
        if step.kind == "copy":
            sources, dest = step.sources, step.dest
            status = run_rooted(store, use.spec, [], env=env, keep_upper=True,
                                inside=lambda root: copy_step(root, sources, dest),
                                **how)  # type: ignore[arg-type]
        else:
            status = run_rooted(store, use.spec, ["sh", "-c", step.text], env=env,
                                keep_upper=True, **how)  # type: ignore[arg-type]
        changed = not is_empty_dir(use.spec.upperdir) or _root_changed(
            use.spec.upperdir, store.layout.layer(parent))
        with store.txn() as conn:
            if status == 0 and not no_cache:
                row = _step_row(conn, config.name, key)
                if row is not None:   # a concurrent build of the same step was quicker
                    _record(conn, config.name, key, step, *row)
                    return 0, row[0]
            if parent not in cat.layer_ids(conn):
                raise OverlayfuseError("a concurrent build replaced the layer below this "
                                       "step; run the build again")
            keep = changed or status != 0
            layer = cat.new_layer_id() if keep else parent
            if keep:
                cat.add_layer(conn, layer, parent)
                # a step that chowned / leaves an upper the user may not move: as its owner
                upper, dest_dir = use.spec.upperdir, store.layout.layer(layer)
                as_owner(lambda: os.rename(upper, dest_dir))
            if status != 0:
                cat.set_ref(conn, config.name, cat.FAILED, layer)
                conn.execute("INSERT OR REPLACE INTO failed(config, number, text, env, created)"
                             " VALUES (?, ?, ?, ?, ?)",
                             (config.name, step.number, step.text, json.dumps(step.env),
                              time.time()))
            else:
                _record(conn, config.name, key, step, layer, time.monotonic() - started,
                        int(changed))
            cat.drop_unheld(conn)
        return status, layer
    finally:
        use.release()
        store.reap()


def _root_changed(upper: str, parent: str) -> bool:
    """A step that only chmod/chowns the root leaves an empty upper that still matters."""
    a, b = os.lstat(upper), os.lstat(parent)
    return (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid)
