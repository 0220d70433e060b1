"""Switching the layers of a live mount: ``freeze`` the upper under a fresh one (a snapshot),
or ``replace`` the whole stack (a rollback, a clean: see its docstring).

In a freeze the merged tree does not change: every entry the upper held is found, from now on, in the
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

import pyfuse3

from .. import format as fmt
from . import atime, inuse, namei
from .inodes import _IN_PARENT, _NO_LOWER, ROOT, Node, _stats, in_parent_lower
from .layers import DirFds, Layer, openat2_beneath
from .overlay import Overlay, _prepare_workdir
from .override import Overrides
from .record import UpperRecord


class Prepared:
    """The new upper and work dir (and for a replace, the new lowers), opened and claimed
    before the gate closes: a switch that cannot start fails here, the mount untouched."""

    def __init__(self, ovl: Overlay, upper: str, work: str,
                 lowers: tuple[str, ...] | None = None) -> None:
        if ovl.upper is None or ovl.spec.workdir is None:
            raise ValueError("a read-only mount has no upper to switch")
        if ovl.inofiles is not None:
            raise ValueError("a mount with zero-message opens cannot switch its layers")
        self.replacing = lowers is not None
        if lowers is None:
            lowers = (ovl.spec.upperdir, *ovl.spec.lowerdirs)
        self.spec = dataclasses.replace(ovl.spec, upperdir=upper, workdir=work,
                                        lowerdirs=tuple(lowers))
        self.root_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.lower_fds: list[int] = []
        self.claims: list[int] = []
        self.work_fd = self.index_fd = -1
        try:
            if os.fstat(self.root_fd).st_dev != ovl.upper.dev:
                raise ValueError(f"{upper} is on another filesystem than the upper")
            if self.replacing:
                for path in lowers:
                    self.lower_fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY
                                                  | os.O_CLOEXEC))
                devs = {os.fstat(fd).st_dev for fd in self.lower_fds} | {ovl.upper.dev}
                if len(devs) > 1 or ovl._xino:
                    # inode numbers are made from the layers' filesystems: one keeps them
                    raise ValueError("a switch keeps to layers on one filesystem")
            self.claims = inuse.claim(self.spec)
            self.work_fd, self.index_fd = _prepare_workdir(work)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.root_fd, self.work_fd, self.index_fd, *self.lower_fds):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.work_fd = self.index_fd = -1
        self.lower_fds = []
        inuse.release(self.claims)
        self.claims = []


def _install(ovl: Overlay, new: Prepared, layers: list[Layer]) -> None:
    """Serve ``layers`` (the new upper first) with the new work dir from now on."""
    ovl.dirfds.close()
    ovl.dirfds = DirFds(layers)
    ovl.layers = layers
    ovl.upper = layers[0]
    ovl.lower_indexes = [layer.index for layer in layers[1:]]
    ovl.lower_pos = {li: pos for pos, li in enumerate(ovl.lower_indexes)}
    ovl._fs_index = {layer.index: 0 for layer in layers} if not ovl._xino else \
        {0: ovl._fs_index[0], **{k + 1: v for k, v in ovl._fs_index.items()}}
    ovl.overrides = Overrides(layers, True, ovl.config.xattr_permissions)
    ovl.record = UpperRecord(new.root_fd, ovl.prefix, durable=not new.spec.volatile)
    for fd in (ovl.work_fd, ovl.index_fd):
        if fd >= 0:
            os.close(fd)
    inuse.release(ovl.claims)
    ovl.work_fd, ovl.index_fd, ovl.claims = new.work_fd, new.index_fd, new.claims
    if ovl.strict_fd >= 0:
        os.close(ovl.strict_fd)
        ovl.strict_fd = atime.strict_clone(new.root_fd)
    ovl.spec = new.spec
    new.root_fd = new.work_fd = new.index_fd = -1  # the overlay owns them now
    new.lower_fds = []
    new.claims = []
    # caches keyed by layer index or naming the old layers: dropped, they refill on demand
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


def freeze(ovl: Overlay, new: Prepared) -> None:
    """Make ``new`` the upper and the current upper the top lower (see the module doc)."""
    old_upper = ovl.upper
    assert old_upper is not None and not new.replacing
    nodes = _all_nodes(ovl)
    # where each node lives in the new stack; computed before anything moves
    plans = [(node, _new_place(node)) for node in nodes]
    layers = [Layer(0, new.spec.upperdir, new.root_fd, old_upper.dev, True)]
    for layer in ovl.layers:
        layers.append(Layer(layer.index + 1, layer.path, layer.root_fd, layer.dev, False))
    _install(ovl, new, layers)
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


def replace(ovl: Overlay, new: Prepared) -> tuple[list[tuple[int, bytes]], list[int]]:
    """Serve another state (a rollback, a clean): the fresh upper on the new lowers.

    Every name the kernel holds is looked up again, parents first: one that leads to the
    same inode (number and kind) keeps its node, with its new place; any other is unbound,
    as if another process had unlinked it, so its node lives on nameless for whoever has it
    open (file._writable_fd keeps such a file's writes out of every layer).  Returns what
    the kernel must forget: (parent, name) entries, those gone and those of the new state it
    may hold as negative ones, and the nodes kept (attributes and data may differ now)."""
    assert ovl.upper is not None and new.replacing
    old_layers = ovl.layers
    layers = [Layer(0, new.spec.upperdir, new.root_fd, ovl.upper.dev, True)]
    for i, (path, fd) in enumerate(zip(new.spec.lowerdirs, new.lower_fds)):
        layers.append(Layer(i + 1, path, fd, os.fstat(fd).st_dev, False))
    _install(ovl, new, layers)
    for layer in old_layers:
        os.close(layer.root_fd)
    table = ovl.table
    root = table.root
    root.upper, root.index = True, None
    root.opaque = False
    root.lower = [(li, b"") for li in ovl.lower_indexes]
    if fmt.is_opaque(layers[0].root_fd, b"", ovl.prefix):
        root.lower = []
    entries: list[tuple[int, bytes]] = []
    kept = [ROOT]
    queue = [root]
    while queue:
        parent = queue.pop()
        names = list(parent.children or ())
        cold = parent.cold
        if cold is not None:
            names += [cold.name(i) for i in range(len(cold.counts))
                      if cold.inos[8 * i:8 * i + 8] != bytes(8)]
        for name in names:
            child = table.child(parent, name)  # a cold entry becomes a node
            if child is None:
                continue
            try:
                found = namei.resolve(ovl, parent, name)
            except (OSError, pyfuse3.FUSEError):
                found = None
            fresh = found[0] if found is not None else None
            if fresh is not None and fresh.ino == child.ino and fresh.kind == child.kind:
                child.upper, child.lower, child.opaque, child.index = (
                    fresh.upper, fresh.lower, fresh.opaque, fresh.index)
                child.nlink_override = fresh.nlink_override
                kept.append(child.ino)
                if child.is_dir:
                    queue.append(child)
            else:
                table.unbind(parent, name)
                entries.append((parent.ino, name))
        held = set(parent.children or ())
        entries += [(parent.ino, name) for name in _layer_names(ovl, parent)
                    if name not in held]
    return entries, kept


def _layer_names(ovl: Overlay, node: Node) -> set[bytes]:
    """Every name in the node's dirs of the new stack (markers too: a superset is enough)."""
    names: set[bytes] = set()
    places = ([(0, node.upath())] if node.upper else []) + ([] if node.opaque else node.lower)
    for li, path in places:
        try:
            fd = openat2_beneath(ovl.layers[li].root_fd, path or b".",
                                 os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            names.update(os.fsencode(n) for n in os.listdir(fd))
        except OSError:
            pass
        finally:
            os.close(fd)
    return names


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
