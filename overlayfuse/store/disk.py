"""A store's directories: where layers, work dirs, locks and half-made things live.

``BASE/layers/<id>`` is a layer (an upper once, then frozen as a lower), ``BASE/work/<id>`` its
work dir while it is a writable upper, ``BASE/locks/<id>`` its flock file.  Anything being made
starts in ``BASE/tmp/<name>/`` guarded by ``BASE/tmp/<name>.lock`` (held while the maker lives),
and reaches ``layers/`` by a rename inside the transaction that records it; a layer that lost its
last reference is renamed back into ``tmp/`` and removed there.  So whatever a SIGKILL
interrupts is either in the catalog, or in ``tmp/`` without a live lock, or an unrecorded dir in
``layers/``: ``gc`` removes the last two.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..probe import rmtree_force
from .locks import held_fresh, is_locked
from .progress import Progress

SUBDIRS = ("layers", "work", "locks", "tmp")


@dataclass(frozen=True)
class Layout:
    """Paths inside one store base."""

    base: str

    @property
    def db(self) -> str:
        return os.path.join(self.base, "store.db")

    def layer(self, layer: str) -> str:
        return os.path.join(self.base, "layers", layer)

    def work(self, layer: str) -> str:
        return os.path.join(self.base, "work", layer)

    def lock(self, layer: str) -> str:
        return os.path.join(self.base, "locks", layer)

    def sub(self, name: str) -> str:
        return os.path.join(self.base, name)

    def create(self, owner: tuple[int, int] | None) -> None:
        """Make the base and its subdirs (mode 0755; given to ``owner`` when we are root)."""
        os.makedirs(os.path.dirname(self.base), exist_ok=True)
        for d in (self.base, *(self.sub(s) for s in SUBDIRS)):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                continue
            if owner is not None and os.geteuid() == 0:
                os.chown(d, *owner)


class TmpEntry:
    """A directory in ``tmp/`` under a lock this process holds until :meth:`close`."""

    def __init__(self, layout: Layout, name: str) -> None:
        self.path = os.path.join(layout.sub("tmp"), name)
        self._lock_path = self.path + ".lock"
        self._fd: int | None = held_fresh(self._lock_path)
        os.mkdir(self.path, 0o755)

    def close(self) -> None:
        """Remove what is left in the entry, then let go of its lock."""
        rmtree_force(self.path)
        if self._fd is not None:
            try:
                os.unlink(self._lock_path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "TmpEntry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_layer_root(path: str, like: str | None, owner: tuple[int, int] | None) -> None:
    """An empty layer dir whose root looks like ``like`` (mode, owner): the merged root of an
    overlay shows the upper's root, so a fresh child must keep the tree's root as it was."""
    os.mkdir(path, 0o755)
    if like is not None:
        st = os.lstat(like)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        uid_gid = (st.st_uid, st.st_gid)
    else:
        uid_gid = owner  # type: ignore[assignment]
    if uid_gid is not None and os.geteuid() == 0:
        os.chown(path, *uid_gid)


def chown_tree_top(paths: list[str], owner: tuple[int, int] | None) -> None:
    if owner is not None and os.geteuid() == 0:
        for p in paths:
            os.chown(p, *owner)


def is_empty_dir(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def tree_size(path: str) -> int:
    """Bytes allocated below ``path`` (each inode once, never following a symlink)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def stale_tmp_entries(layout: Layout) -> list[str]:
    """Entries of ``tmp/`` whose maker is gone (no lock file, or one nobody holds)."""
    tmp = layout.sub("tmp")
    names = set(os.listdir(tmp))
    out = []
    for name in sorted(names):
        if name.endswith(".lock"):
            if name[:-5] not in names and not is_locked(os.path.join(tmp, name)):
                out.append(name)
            continue
        if not is_locked(os.path.join(tmp, name + ".lock")):
            out.append(name)
    return out


def remove_tmp_entries(layout: Layout, names: list[str], progress: Progress) -> None:
    tmp = layout.sub("tmp")
    for i, name in enumerate(names):
        progress.update(f"removing leftover {i + 1}/{len(names)}")
        path = os.path.join(tmp, name)
        if os.path.isdir(path) and not os.path.islink(path):
            rmtree_force(path)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            if not is_locked(path + ".lock"):
                os.unlink(path + ".lock")
        except FileNotFoundError:
            pass
