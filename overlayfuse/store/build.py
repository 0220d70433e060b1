"""``overlayfuse build``: a step file run step by step, each step's result cached as a layer.

vagga's planned ``--cache-each-step``: step N runs with ``sh -c`` with the merged tree of step
N-1's layer as ``/`` (``rooted``: its own namespaces, cwd ``/``), and its upper is kept as a
layer keyed by sha256(parent key, step text), so a rerun reuses every unchanged step and
starts at the first changed one.  A failing step keeps
the steps before it; the next run starts at the failed one.  The result becomes the config's
current state (and, with ``--tag``, a snapshot of that name).  A step that changes nothing
keeps its parent's layer, so no empty layers pile up in the chain.  Whatever a step leaves
running dies with it (its PID namespace), so nothing writes a layer once it is frozen.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

from typing import Sequence

from ..errors import OverlayfuseError
from ..sandbox import Bind
from . import catalog as cat
from .config import Config
from .disk import as_owner, is_empty_dir
from .rooted import Network, run_rooted
from .store import check_name
from .use import Use, take


def parse_steps(text: str) -> list[str]:
    """One step a line; blank lines and ``#`` comments skipped; a trailing ``\\`` continues."""
    steps: list[str] = []
    pending = ""
    for line in text.splitlines():
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        steps.append(line.strip())
    if pending:
        steps.append(pending.strip())
    return steps


def step_key(parent_key: str, step: str) -> str:
    return hashlib.sha256(f"{parent_key}\0{step}".encode()).hexdigest()


def _say(text: str) -> None:
    print(f"overlayfuse build: {text}", file=sys.stderr, flush=True)


def build(config: Config, stepfile: str, *, from_dir: str | None = None,
          from_config: str | None = None, tag: str | None = None, no_cache: bool = False,
          backend: str = "auto", binds: Sequence[Bind] = (), network: Network = "host") -> int:
    """Build ``config`` from ``stepfile``: 0, or the exit status of the step that failed.
    Each step sees the tree as ``/``, plus ``binds`` (host paths) and the ``network``."""
    if tag is not None:
        check_name(tag, "snapshot")
    try:
        with open(stepfile, encoding="utf-8") as f:
            steps = parse_steps(f.read())
    except OSError as e:
        raise OverlayfuseError(f"cannot read the step file {stepfile}: {e.strerror}") from None
    if not steps:
        raise OverlayfuseError(f"the step file {stepfile} has no steps")
    store = config.store
    if not config.exists():
        config.init(from_dir=from_dir, from_config=from_config)
    elif from_dir is not None or from_config is not None:
        if from_dir is not None:
            asked = f"dir {os.path.realpath(from_dir)}"
        else:
            other, _, snap = (from_config or "").partition(":")
            asked = f"config {other}:{snap or '(current)'}"
        if asked != config.origin:
            raise OverlayfuseError(f"config {config.name!r} exists and was made from "
                                   f"{config.origin}, not {asked} (scrub it to start over)")
    conn = store.db()
    base = cat.ref(conn, config.name, cat.BASE)
    assert base is not None
    key, layer = f"layer {base}", base
    cached = 0
    for number, step in enumerate(steps, 1):
        key = step_key(key, step)
        label = f"[{number}/{len(steps)}]"
        row = None if no_cache else conn.execute(
            "SELECT layer, seconds FROM steps WHERE config=? AND key=?",
            (config.name, key)).fetchone()
        if row is not None:
            layer = row[0]
            cached += 1
            _say(f"{label} cached (ran in {row[1]:.1f} s): {step}")
            continue
        _say(f"{label} running: {step}")
        started = time.monotonic()
        status, layer = _run_step(config, layer, key, step, no_cache,
                                  dict(backend=backend, binds=tuple(binds), network=network))
        took = time.monotonic() - started
        if status != 0:
            _say(f"{label} failed with exit status {status} after {took:.1f} s: {step}")
            return status
        _say(f"{label} ran in {took:.1f} s")
    with store.txn() as conn:
        config._busy_upper(conn, "set the build result")
        cat.set_ref(conn, config.name, cat.CURRENT, layer)
        cat.set_ref(conn, config.name, cat.UPPER, layer)
        if tag is not None:
            cat.set_ref(conn, config.name, tag, layer)
        cat.drop_unheld(conn)
    store.reap()
    _say(f"built {config.name}: {len(steps)} steps, {cached} cached"
         + (f", tagged {tag}" if tag else ""))
    return 0


def _run_step(config: Config, parent: str, key: str, step: str, no_cache: bool,
              how: dict[str, object]) -> tuple[int, str]:
    """Run one step on top of ``parent``: (exit status, the layer holding its result)."""
    store = config.store
    use = _stack_on(config, parent)
    started = time.monotonic()
    try:
        assert use.tmp is not None and use.spec.upperdir is not None
        status = run_rooted(store, use.spec, ["sh", "-c", step], keep_upper=True,
                            **how)  # type: ignore[arg-type]
        if status != 0:
            return status, parent
        changed = not is_empty_dir(use.spec.upperdir) or _root_changed(
            use.spec.upperdir, store.layout.layer(parent))
        with store.txn() as conn:
            row = conn.execute("SELECT layer FROM steps WHERE config=? AND key=?",
                               (config.name, key)).fetchone()
            if row is not None and not no_cache:
                return 0, row[0]     # a concurrent build of the same step was quicker
            if parent not in cat.layer_ids(conn):
                raise OverlayfuseError("a concurrent build replaced the layer below this "
                                       "step; run the build again")
            layer = cat.new_layer_id() if changed else parent
            if changed:
                cat.add_layer(conn, layer, parent)
                # a step that chowned / leaves an upper the user may not move: as its owner
                upper, dest = use.spec.upperdir, store.layout.layer(layer)
                as_owner(lambda: os.rename(upper, dest))
            conn.execute("INSERT OR REPLACE INTO steps(config, key, layer, seconds) "
                         "VALUES (?, ?, ?, ?)",
                         (config.name, key, layer, time.monotonic() - started))
            cat.drop_unheld(conn)
        return 0, layer
    finally:
        use.release()
        store.reap()


def _stack_on(config: Config, parent: str) -> Use:
    """A throwaway upper on top of ``parent``'s chain, its layers locked as lowers."""
    return take(config.store, config.name, mode="throwaway", top=parent)


def _root_changed(upper: str, parent: str) -> bool:
    """A step that only chmod/chowns the root leaves an empty upper that still matters."""
    a, b = os.lstat(upper), os.lstat(parent)
    return (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid)
