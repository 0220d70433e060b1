"""Switching the layers of a live mount: freeze the upper under a fresh one (a snapshot).

The merged tree does not change: every entry the upper held is found, from now on, in the
same place of the frozen layer, which becomes the top lower (index 1); the old lowers move
down by one.  So the inode table keeps every node id the kernel knows, and only where each
node lives is rewritten: an upper node becomes a lower one at its upper path, a lower one
moves one layer down.  Open handles carry the epoch of the stack they were opened in
(file._source): a read goes on through the frozen copy, the first change copies the file up
into the new upper (file._writable_fd), so the frozen layer is never written again.

The caller (control.py) has closed the request gate: no request is half done, none starts
until the switch is over, and nothing here awaits.
"""
from __future__ import annotations

import dataclasses
import os

from . import inuse
from .inodes import _IN_PARENT, _NO_LOWER, ROOT, Node, _stats, in_parent_lower
from .layers import DirFds, Layer
from .overlay import Overlay, _prepare_workdir
from .override import Overrides
from .record import UpperRecord


class Prepared:
    """The new upper and work dir, opened and claimed before the gate closes: a switch that
    cannot start fails here, with the mount untouched."""

    def __init__(self, ovl: Overlay, upper: str, work: str) -> None:
        if ovl.upper is None or ovl.spec.workdir is None:
            raise ValueError("a read-only mount has no upper to freeze")
        if ovl.inofiles is not None:
            raise ValueError("a mount with zero-message opens cannot switch its layers")
        self.spec = dataclasses.replace(ovl.spec, upperdir=upper, workdir=work,
                                        lowerdirs=(ovl.spec.upperdir, *ovl.spec.lowerdirs))
        self.root_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.claims: list[int] = []
        self.work_fd = self.index_fd = -1
        try:
            if os.fstat(self.root_fd).st_dev != ovl.upper.dev:
                raise ValueError(f"{upper} is on another filesystem than the upper")
            self.claims = inuse.claim(self.spec)
            self.work_fd, self.index_fd = _prepare_workdir(work)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.root_fd, self.work_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.work_fd = self.index_fd = -1
        inuse.release(self.claims)
        self.claims = []


def freeze(ovl: Overlay, new: Prepared) -> None:
    """Make ``new`` the upper and the current upper the top lower (see the module doc)."""
    old_upper = ovl.upper
    assert old_upper is not None
    nodes = _all_nodes(ovl)
    # where each node lives in the new stack; computed before anything moves
    plans = [(node, _new_place(node)) for node in nodes]
    layers = [Layer(0, new.spec.upperdir, new.root_fd, old_upper.dev, True)]
    for layer in ovl.layers:
        layers.append(Layer(layer.index + 1, layer.path, layer.root_fd, layer.dev, False))
    ovl.dirfds.close()
    ovl.dirfds = DirFds(layers)
    ovl.layers = layers
    ovl.upper = layers[0]
    ovl.lower_indexes = [layer.index for layer in layers[1:]]
    ovl.lower_pos = {li: pos for pos, li in enumerate(ovl.lower_indexes)}
    ovl._fs_index = {0: ovl._fs_index[0], **{k + 1: v for k, v in ovl._fs_index.items()}}
    ovl.overrides = Overrides(layers, True, ovl.config.xattr_permissions)
    ovl.record = UpperRecord(new.root_fd, ovl.prefix, durable=not new.spec.volatile)
    for fd in (ovl.work_fd, ovl.index_fd):
        if fd >= 0:
            os.close(fd)
    inuse.release(ovl.claims)
    ovl.work_fd, ovl.index_fd, ovl.claims = new.work_fd, new.index_fd, new.claims
    if ovl.strict_fd >= 0:
        from . import atime
        os.close(ovl.strict_fd)
        ovl.strict_fd = atime.strict_clone(new.root_fd)
    ovl.spec = new.spec
    new.root_fd = new.work_fd = new.index_fd = -1  # the overlay owns them now
    new.claims = []
    for node, place in plans:
        if place is None:
            continue
        if node.ino == ROOT:
            node.lower = place  # the fresh upper has a root already
            node.opaque = False
            continue
        if node.upper or node.index is not None:
            # its upper dir's opaque marker now cuts the stack in the frozen layer (place)
            node.upper, node.index, node.opaque = False, None, False
        node.lower = place
    for parent in ovl.table._cold_dirs:
        cold = parent.cold if parent is not None else None
        if cold is None:
            continue
        for i in range(len(cold.meta)):
            meta = cold.meta[i]
            layer = 1 if meta & 16 else (meta >> 5) + 1
            cold.meta[i] = (meta & 15) | layer << 5
    # caches keyed by layer index or naming the old upper: dropped, they refill on demand
    ovl._uuids.clear()
    ovl._lower_names.clear()
    ovl._lower_names_count = 0
    ovl._lower_misses.clear()
    ovl._lower_too_big.clear()
    ovl._first_layer.clear()
    ovl._first_layer_count = 0
    ovl._listings.clear()
    ovl._listed_names = 0
    ovl._big_listings.clear()
    _stats.clear()
    ovl.epoch += 1


def _all_nodes(ovl: Overlay) -> list[Node]:
    return list(ovl.table._nodes.values())


def _new_place(node: Node) -> list | None:
    """The node's ``lower`` in the new stack; None: it stays where it is (an upper node with
    no name left lives only through its open fds, outside every layer's tree)."""
    if node.upper or node.index is not None:
        if node.parent is None and node.ino != ROOT:
            return None
        path = node.upath()
        if not node.is_dir:
            return [(1, path)]
        below = [] if node.opaque else _shifted(node.lower)
        return [(1, path), *below]
    return _shifted(node.lower)


def _shifted(lower: list) -> list:
    if lower is _NO_LOWER or not lower:
        return _NO_LOWER
    if len(lower) == 1 and _IN_PARENT.get(lower[0][0]) is lower:
        return in_parent_lower(lower[0][0] + 1)
    return [(li + 1, path) for li, path in lower]
