"""A concurrent mixed workload for one mount, and its replay on a kernel overlay.

Each worker process owns a subtree ``p<N>`` built from the differential tests' lower template
(tests/ops.py) and runs random operations on it: creates, appends to lower files, renames
within and across dirs, unlinks, readdirs, stats, mmap reads and writes, hard links, xattrs and
open descriptors kept across other changes.  Operations in different subtrees commute, so
replaying each worker's log, one worker after the other, on a kernel overlay over the same
lowers must give every operation the same outcome and the same final tree.  All workers also
contend in ``shared/`` (mkdir, rmdir, create, unlink, rename of a few common names), where the
order decides the outcome: there only the errnos that some order can give (on any filesystem,
per operation and target: SHARED_ERRNOS) are allowed, never ESTALE or EIO.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any

from ops import (DATA, DIRISH, OFFSETS, PATHS, RENAME_NOREPLACE, SLOTS, XATTR_VALUES, Ctx, Op,
                 apply, build_lowers)

SHARED = "shared"
_USER_XATTRS = ("user.k1", "user.foo")
_KINDS = (  # (kind, weight)
    ("create", 6), ("append", 8), ("write", 3), ("rename", 8), ("unlink", 5), ("mkdir", 4),
    ("rmdir", 3), ("link", 4), ("listdir", 5), ("stat", 8), ("read", 5), ("setxattr", 3),
    ("getxattr", 2), ("listxattr", 2), ("removexattr", 1), ("mmap_read", 4), ("mmap_write", 4),
    ("fd_open", 3), ("fd_read", 2), ("fd_write", 2), ("fd_fstat", 2), ("fd_close", 1),
)
_NAMES, _WEIGHTS = zip(*_KINDS)
# What some order of the other workers' operations can make a shared-dir operation answer
# on any filesystem, per operation and target (see shared_form).  shared/ is made before the
# mount and no operation removes or renames it; only fN are files and only dN and dN/s dirs.
SHARED_ERRNOS: dict[str, frozenset[str]] = {
    "mkdir dN": frozenset({"EEXIST"}),  # another worker made dN first
    # EEXIST: s made first; ENOENT: dN not made yet, or removed meanwhile
    "mkdir dN/s": frozenset({"EEXIST", "ENOENT"}),
    # ENOENT: dN removed first, or never made; ENOTEMPTY: another worker made dN/s in it
    "rmdir dN": frozenset({"ENOENT", "ENOTEMPTY"}),
    # ENOENT: s (or dN) not there; nothing is ever made inside s, so never ENOTEMPTY
    "rmdir dN/s": frozenset({"ENOENT"}),
    # O_CREAT without O_EXCL in a dir that stays: the file is made or the one found opened
    # (an unlink or rename after the lookup leaves what it opened valid): never an errno
    "create fN": frozenset(),
    "unlink fN": frozenset({"ENOENT"}),  # another worker unlinked or renamed it away first
    # ENOENT: the source is not there (unlinked or renamed away); the target, if any, is a
    # file in the same dir, which a rename replaces
    "rename fN": frozenset({"ENOENT"}),
    "stat dN/s": frozenset({"ENOENT"}),  # s or dN not there
    "listdir shared": frozenset(),  # shared/ always there
}


def build_layers(lowers: list[Path], workers: int) -> None:
    """The lower template once per worker, as ``p<N>`` in each of the two lowers."""
    scratch = lowers[0].parent / "template"
    for n in range(workers):
        top, bottom = build_lowers(scratch / f"p{n}")
        os.rename(top, lowers[0] / f"p{n}")
        os.rename(bottom, lowers[1] / f"p{n}")
    shutil.rmtree(scratch)


def _path(rng: random.Random) -> str:
    return rng.choice(PATHS) if rng.random() < 0.75 else rng.choice(DIRISH)


def private_op(rng: random.Random) -> Op:
    """One random operation on a worker's own subtree."""
    kind = rng.choices(_NAMES, _WEIGHTS)[0]
    p = _path(rng)
    if kind in ("create", "append"):
        return Op(kind, (p, rng.choice(DATA)))
    if kind == "write":
        return Op(kind, (p, rng.choice(OFFSETS), rng.choice(DATA)))
    if kind == "rename":
        return Op(kind, (p, _path(rng), rng.choice((0, 0, 0, RENAME_NOREPLACE))))
    if kind == "mkdir":
        return Op(kind, (p, 0o755))
    if kind == "link":
        return Op(kind, (p, _path(rng)))
    if kind == "stat":
        return Op(kind, (p, rng.random() < 0.3))
    if kind == "setxattr":
        return Op(kind, (p, rng.choice(_USER_XATTRS), rng.choice(XATTR_VALUES), 0))
    if kind in ("getxattr", "removexattr"):
        return Op(kind, (p, rng.choice(_USER_XATTRS)))
    if kind == "mmap_read":
        return Op(kind, (p, rng.choice(OFFSETS), rng.choice((1, 100, 10000))))
    if kind == "mmap_write":
        return Op(kind, (p, rng.choice(OFFSETS), rng.choice(DATA[1:])))
    if kind == "fd_open":
        return Op(kind, (rng.choice(SLOTS), p, rng.choice(("r", "rw", "a"))))
    if kind in ("fd_read", "fd_fstat", "fd_close"):
        return Op(kind, (rng.choice(SLOTS),))
    if kind == "fd_write":
        return Op(kind, (rng.choice(SLOTS), rng.choice((0, 3)), rng.choice(DATA)))
    return Op(kind, (p,))


def shared_op(rng: random.Random) -> Op:
    """One operation on the names every worker uses in ``shared/``."""
    d, f = f"{SHARED}/d{rng.randrange(4)}", f"{SHARED}/f{rng.randrange(4)}"
    choice = rng.randrange(9)
    if choice < 2:
        return Op("mkdir", (d if choice == 0 else d + "/s", 0o755))
    if choice < 4:
        return Op("rmdir", (d if choice == 2 else d + "/s",))
    return [Op("create", (f, b"shared\n")), Op("unlink", (f,)),
            Op("rename", (f, f"{SHARED}/f{rng.randrange(4)}", 0)),
            Op("stat", (d + "/s", False)), Op("listdir", (SHARED,))][choice - 4]


def shared_form(op: Op) -> str:
    """The key of ``SHARED_ERRNOS`` for a shared-dir operation: its kind and target's form."""
    target = op.args[0].removeprefix(SHARED + "/")
    if target == SHARED:
        return f"{op.kind} {SHARED}"
    return f"{op.kind} {target[0]}N{'/s' if target.endswith('/s') else ''}"


def _mmap(path: str, off: int, length: int, data: bytes | None) -> Any:
    fd = os.open(path, (os.O_RDWR if data else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty"
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if data else 0)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, prot) as m:
            if data is None:
                return bytes(m[off:off + length])
            part = data[:max(0, size - off)]
            m[off:off + len(part)] = part
            m.flush()
            return len(part)
    finally:
        os.close(fd)


def run_op(op: Op, ctx: Ctx) -> tuple[Any, ...]:
    """The outcome of ``op``, comparable between two mounts: long data as a digest, inode
    numbers left out (the other workers decide which numbers the backing fs reuses)."""
    if op.kind in ("mmap_read", "mmap_write"):
        path, off, arg = op.args
        try:
            outcome: tuple[Any, ...] = ("ok", _mmap(ctx.p(path), off, arg if op.kind == "mmap_read"
                                                     else 0, None if op.kind == "mmap_read" else arg))
        except OSError as e:
            outcome = ("err", errno.errorcode.get(e.errno, str(e.errno)))
    else:
        outcome = apply(op, ctx)
    status, value = outcome
    if status == "ok" and op.kind in ("stat", "fd_fstat") and isinstance(value, tuple):
        value = value[:7] + (None,) + value[8:]
    if isinstance(value, bytes) and len(value) > 32:
        value = hashlib.sha256(value).hexdigest()
    return status, value


def worker(mnt: str, n: int, seconds: float, seed: int, out: str, progress: Any) -> None:
    """Run until the deadline; write (private log, unexpected shared outcomes) to ``out``."""
    rng = random.Random(seed * 1000 + n)
    own = Ctx(os.path.join(mnt, f"p{n}"))
    root = Ctx(mnt)
    log: list[tuple[Op, tuple[Any, ...]]] = []
    unexpected: list[tuple[Op, tuple[Any, ...]]] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if rng.random() < 0.25:
                op = shared_op(rng)
                status, value = run_op(op, root)
                if status == "err" and value not in SHARED_ERRNOS[shared_form(op)]:
                    unexpected.append((op, (status, value)))
            else:
                op = private_op(rng)
                log.append((op, run_op(op, own)))
            progress[n] += 1
    finally:
        own.close_all()
        with open(out, "wb") as f:
            pickle.dump((log, unexpected), f)


def replay(mnt: str, n: int, log: list[tuple[Op, tuple[Any, ...]]]) -> list[str]:
    """Apply a worker's log to another mount; the first few operations whose outcome differs."""
    ctx = Ctx(os.path.join(mnt, f"p{n}"))
    diffs = []
    try:
        for i, (op, got) in enumerate(log):
            want = run_op(op, ctx)
            if want != got and len(diffs) < 5:
                diffs.append(f"p{n} op {i} {op!r}: kernel {want!r}, overlayfuse {got!r}")
    finally:
        ctx.close_all()
    return diffs
