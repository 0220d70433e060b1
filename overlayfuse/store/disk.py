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

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from typing import Callable

from ..errors import OverlayfuseError
from ..sandbox import plan_ids, run_as_mapped_root
from .locks import held_fresh, is_locked
from .progress import Progress

log = logging.getLogger(__name__)
DENIED = (errno.EACCES, errno.EPERM)

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

    def control(self, mountpoint: str) -> str:
        """The control socket of the daemon serving ``mountpoint`` (store/live.py)."""
        digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
        return os.path.join(self.base, "run", digest + ".sock")

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
    """A directory in ``tmp/`` under a lock this process holds until :meth:`close`.

    Made by root in a user's store, both are given to the owner of ``tmp/``: a leftover of a
    killed root process stays the user's to remove.
    """

    def __init__(self, layout: Layout, name: str) -> None:
        tmp = layout.sub("tmp")
        self.path = os.path.join(tmp, name)
        self._lock_path = self.path + ".lock"
        self._fd: int | None = held_fresh(self._lock_path)
        os.mkdir(self.path, 0o755)
        if os.geteuid() == 0:
            st = os.stat(tmp)
            if st.st_uid != 0:
                os.chown(self._lock_path, st.st_uid, st.st_gid)
                os.chown(self.path, st.st_uid, st.st_gid)

    @property
    def lock_path(self) -> str:
        """Held while this process lives: others can tell whether the maker is still at it."""
        return self._lock_path

    def close(self) -> None:
        """Remove what is left in the entry (what cannot be is left to ``gc``, with a
        warning), then let go of its lock."""
        err = remove_tree(self.path)
        if err:
            log.warning("%s (left for gc)", err)
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
    if uid_gid is None:
        return
    if os.geteuid() == 0:
        os.chown(path, *uid_gid)
    elif like is not None and uid_gid != (os.geteuid(), os.getegid()):
        _take_owner_as_mapped_root(path, like)


def _take_owner_as_mapped_root(path: str, like: str) -> None:
    """A normal user's layer root owned by a subordinate ID (a run did ``chown 1000 /``): only
    root of the user's namespace can give the fresh root the same owner; there ``like``'s
    owner reads as the ID the runs see."""
    def copy_owner() -> None:
        st = os.lstat(like)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown may have dropped setgid

    try:
        run_as_mapped_root(copy_owner)
    except OverlayfuseError as e:
        log.warning("the new layer root %s keeps your own owner, not %s's: %s", path, like, e)


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


def remove_tmp_entries(layout: Layout, names: list[str], progress: Progress,
                       errors: list[str]) -> int:
    """Remove the ``tmp/`` entries ``names`` (and their free lock files): how many are really
    gone; why the others are not is added to ``errors``."""
    tmp = layout.sub("tmp")
    gone = 0
    for i, name in enumerate(names):
        progress.update(f"removing leftover {i + 1}/{len(names)}")
        path = os.path.join(tmp, name)
        err = remove_tree(path)
        if err:
            errors.append(err)
            continue
        gone += 1
        try:
            if not is_locked(path + ".lock"):
                os.unlink(path + ".lock")
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"cannot remove {path}.lock: {e.strerror or e}")
    return gone


def remove_tree(path: str) -> str | None:
    """Remove ``path`` and everything below it: None once it is gone, else why not (one line).

    A normal user's runs leave files that subordinate IDs own, and mode-000 dirs, which the
    user cannot unlink or chmod from outside: on EACCES/EPERM the removal is done again as
    root of a user namespace with the user's map (CAP_DAC_OVERRIDE/CAP_FOWNER over them all).
    """
    try:
        _remove(path)
        return None
    except OSError as e:
        first = e
    if first.errno not in DENIED or os.geteuid() == 0:
        return f"cannot remove {path}: {_why(first)}"
    plan = plan_ids("auto")
    try:
        err = run_as_mapped_root(lambda: _try_remove(path), plan)
    except OverlayfuseError as e:
        err = str(e)
    if err is None and os.path.lexists(path):
        err = "still there"
    if err is None:
        return None
    hint = "" if plan.mode == "subids" else f" ({plan.note})"
    return f"cannot remove {path}: {err}{hint}"


def _try_remove(path: str) -> str | None:
    """``_remove``, its failure as a short text (what crosses back from the namespace)."""
    try:
        _remove(path)
    except OSError as e:
        return _why(e)
    return None


def as_owner(fn: Callable[[], None]) -> None:
    """``fn()``, done again as root of the user's namespace when the user may not (a rename
    of a dir a subordinate ID owns: it needs write access to the dir itself)."""
    try:
        fn()
    except OSError as e:
        if e.errno not in DENIED or os.geteuid() == 0:
            raise
        try:
            run_as_mapped_root(fn)
        except OverlayfuseError:
            raise e from None


def _why(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def _remove(path: str) -> None:
    """Remove ``path`` (any type) and all below it, opening up dirs that deny their owner;
    the first failure raises (a vanished entry is no failure).  No recursion: layer trees
    may be deeper than Python's stack."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(path)
        return
    stack = [path]
    while stack:
        d = stack[-1]
        try:
            st = os.lstat(d)
            if st.st_mode & 0o700 != 0o700:
                os.chmod(d, stat.S_IMODE(st.st_mode) | 0o700)
            subdirs = []
            with os.scandir(d) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                    else:
                        _unlink(entry.path)
            if subdirs:
                stack.extend(subdirs)
                continue
            os.rmdir(d)
        except FileNotFoundError as e:
            if e.filename not in (d, None):
                raise
        stack.pop()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
