"""The workloads: each one a small function timed on a mounted system.

A workload names its fixture (the cached lowers it needs), its modes (``cold`` runs right after
a fresh mount and a cache drop; ``warm`` repeats the same work on the same mount; the lookup
series has ``cached``: new names in directories already looked up) and whether it writes
(then ``raw`` gets a private copy). Each function checks what it did (entry counts, bytes,
a clean ``git status``) so a broken system fails loudly instead of looking fast.
"""
from __future__ import annotations

import mmap
import os
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import layers
from bench.layers import Fixture
from bench.sizes import MiB, Sizes

CHUNK = MiB


@dataclass
class Ctx:
    """What a workload function gets: the merged tree's root and its fixture."""

    root: Path
    fixture: Fixture
    sizes: Sizes
    cache: Path
    timeout: float


@dataclass
class Workload:
    name: str
    what: str
    fixture: Callable[[Path, Sizes], Fixture]
    fn: Callable[[Ctx, str], None]
    modes: tuple[str, ...] = ("cold",)
    mutating: bool = False
    group: str = "main"        # main | lookup | rss (how the report shows it)
    max_reps: int | None = None  # cap for the expensive ones (full runs only)
    ops: int = 0               # operations per pass, for per-op latency
    extra: dict[str, object] = field(default_factory=dict)


class WorkloadError(Exception):
    """The system under test did something wrong (not a timing problem)."""


def _sh(ctx: Ctx, argv: list[str], cwd: Path | None = None) -> bytes:
    r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=ctx.timeout,
                       env=dict(os.environ, LC_ALL="C"))
    if r.returncode != 0:
        raise WorkloadError(f"{' '.join(argv[:3])}: exit {r.returncode}: "
                            f"{r.stderr.decode(errors='replace').strip()[:300]}")
    return r.stdout


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise WorkloadError(msg)


# ---------------------------------------------------------------------------------------------
# read side


def stat_tree(ctx: Ctx, mode: str) -> None:
    """lstat every entry of the tree (find prints each size, so it must stat each)."""
    out = _sh(ctx, ["find", ".", "-printf", "%s\n"], cwd=ctx.root)
    n = out.count(b"\n") - 1
    _check(n == ctx.fixture.info["entries"], f"find saw {n} entries, "
           f"expected {ctx.fixture.info['entries']}")


def list_bigdir(ctx: Ctx, mode: str) -> None:
    """getdents of one big merged directory (names only)."""
    n = len(os.listdir(ctx.root / "big"))
    _check(n == ctx.fixture.info["entries"], f"listed {n} entries, expected "
           f"{ctx.fixture.info['entries']}")


def _read_all(path: Path, buf: bytearray) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        total, view = 0, memoryview(buf)
        while True:
            n = os.readv(fd, [view])
            if n == 0:
                return total
            total += n
    finally:
        os.close(fd)


def read_big(ctx: Ctx, mode: str) -> None:
    """Sequential read of the big lower file, 1 MiB at a time."""
    n = _read_all(ctx.root / ctx.fixture.info["file"], bytearray(CHUNK))
    _check(n == ctx.fixture.info["bytes"], f"read {n} bytes, expected {ctx.fixture.info['bytes']}")


def read_small(ctx: Ctx, mode: str) -> None:
    """open/read/close many small lower files."""
    buf = bytearray(64 * 1024)
    files = ctx.fixture.info["files"][:ctx.sizes.small_read_count]
    total = sum(_read_all(ctx.root / f, buf) for f in files)
    _check(total == len(files) * ctx.sizes.small_size, f"read {total} bytes from small files")


def git_status(ctx: Ctx, mode: str) -> None:
    """`git status` in a repository that lives in a lower layer; it must be clean."""
    # the cached repo may belong to another user (--as-user runs hand it over): git must not
    # refuse it as of dubious ownership
    out = _sh(ctx, ["git", "-c", "safe.directory=*", "status", "--porcelain"],
              cwd=ctx.root / ctx.fixture.info["repo"])
    _check(out.strip() == b"", f"git status not clean: {out[:200]!r}")


def lookup(ctx: Ctx, mode: str) -> None:
    """lstat names found only in the bottom layer: the first half cold, the second half in
    directories the system has already looked up ("cached")."""
    names = ctx.fixture.info["names"]
    k = len(names) // 2
    part = names[:k] if mode == "cold" else names[k:]
    root = str(ctx.root)
    for n in part:
        os.lstat(f"{root}/{n}")


def walk_tree(ctx: Ctx, mode: str) -> None:
    """Walk and lstat a huge tree (the daemon's peak RSS is the point)."""
    stat_tree(ctx, mode)


# ---------------------------------------------------------------------------------------------
# write side


def _write_new(path: Path, nbytes: int, fsync: bool) -> None:
    block = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block if left >= CHUNK else block[:left])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_big(ctx: Ctx, mode: str) -> None:
    """Sequential write of a new big file, 1 MiB writes, no fsync."""
    _write_new(ctx.root / "new.bin", ctx.sizes.write_bytes, fsync=False)


def write_big_fsync(ctx: Ctx, mode: str) -> None:
    """The same, then fsync before close."""
    _write_new(ctx.root / "new.bin", ctx.sizes.write_bytes, fsync=True)


def create_small(ctx: Ctx, mode: str) -> None:
    """Create small files (100 bytes each) in 10 new directories."""
    data = b"x" * 100
    per = max(1, ctx.sizes.create_count // 10)
    for d in range(10):
        dpath = ctx.root / f"new{d}"
        os.mkdir(dpath)
        dfd = os.open(dpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for k in range(per):
                fd = os.open(f"f{k:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                             dir_fd=dfd)
                os.write(fd, data)
                os.close(fd)
        finally:
            os.close(dfd)


def _append(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"appended line\n")
    finally:
        os.close(fd)


def copyup_small(ctx: Ctx, mode: str) -> None:
    """Append a line to many small lower files (each one a copy-up)."""
    for f in ctx.fixture.info["files"][:ctx.sizes.copyup_small_count]:
        _append(ctx.root / f)


def copyup_big(ctx: Ctx, mode: str) -> None:
    """Append a line to one big lower file (one big copy-up)."""
    path = ctx.root / ctx.fixture.info["file"]
    _append(path)
    _check(os.stat(path).st_size == ctx.fixture.info["bytes"] + 14, "append lost")


def delete_tree(ctx: Ctx, mode: str) -> None:
    """rm -rf a lower tree (every entry becomes a whiteout)."""
    targets = ctx.fixture.info["delete"]
    _sh(ctx, ["rm", "-rf", *targets], cwd=ctx.root)
    _check(not any(os.path.lexists(ctx.root / t) for t in targets), "rm -rf left entries")


def rename_small(ctx: Ctx, mode: str) -> None:
    """Rename lower files within their directory."""
    files = ctx.fixture.info["files"]
    start = ctx.sizes.copyup_small_count
    root = str(ctx.root)
    for f in files[start:start + ctx.sizes.rename_count]:
        os.rename(f"{root}/{f}", f"{root}/{f}.renamed")


def untar(ctx: Ctx, mode: str) -> None:
    """Extract the stdlib tarball into the mount."""
    dst = ctx.root / "src"
    os.mkdir(dst)
    _sh(ctx, ["tar", "-xf", str(layers.stdlib_tar(ctx.cache, ctx.sizes)), "-C", str(dst)])


def small_writes(ctx: Ctx, mode: str) -> None:
    """Many 4-byte O_APPEND writes to one new file: one request each without write caching."""
    n = ctx.sizes.small_writes
    path = ctx.root / "appends.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    try:
        for _ in range(n):
            os.write(fd, b"abc\n")
    finally:
        os.close(fd)
    _check(os.stat(path).st_size == 4 * n, f"appended {os.stat(path).st_size} bytes, not {4 * n}")


def _mixed_worker(root: str, lower_files: list[str], me: int, n: int) -> None:
    """One process of the mixed load: its own dir for namespace changes, shared lower files
    for appends (copy-ups), stats, reads and mmap reads; appends commute, so any order works."""
    own, sub = f"{root}/load{me}", f"{root}/load{me}/sub"
    os.mkdir(own)
    os.mkdir(sub)
    mine: list[str] = []
    for i in range(n):
        lower = f"{root}/{lower_files[(me * 7919 + i) % len(lower_files)]}"
        op = i % 8
        if op == 0 or not mine:
            path = f"{own}/f{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)
            mine.append(path)
        elif op == 1:
            fd = os.open(lower, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"+")
            os.close(fd)
        elif op == 2:
            new = f"{own}/r{i}"
            os.rename(mine.pop(0), new)
            mine.append(new)
        elif op == 3:
            new = f"{sub}/m{i}"
            os.rename(mine.pop(), new)
            mine.append(new)
        elif op == 4:
            os.unlink(mine.pop(0))
        elif op == 5:
            os.listdir(own)
            os.listdir(os.path.dirname(lower))
        elif op == 6:
            os.stat(lower)
            os.stat(mine[-1])
        else:
            fd = os.open(lower, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                    _check(len(m[:size]) == size, "short mmap read")
            finally:
                os.close(fd)


def mixed_load(ctx: Ctx, mode: str) -> None:
    """``mixed_procs`` processes doing a fixed number of mixed operations each, at once."""
    pids = []
    for me in range(ctx.sizes.mixed_procs):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                _mixed_worker(str(ctx.root), ctx.fixture.info["files"], me, ctx.sizes.mixed_ops)
                code = 0
            except BaseException:  # noqa: BLE001 - reported, then the child ends
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
    _check(not failed, f"{len(failed)} of {len(pids)} load processes failed (see stderr)")


# ---------------------------------------------------------------------------------------------
# the registry


def _walk_fixture(n: int) -> Callable[[Path, Sizes], Fixture]:
    return lambda cache, s: layers.walk(cache, n)


def _lookup_fixture(n: int) -> Callable[[Path, Sizes], Fixture]:
    return lambda cache, s: layers.lookup_layers(cache, s, n)


def _fmt_bytes(n: int) -> str:
    return f"{n // 1024 // MiB} GiB" if n >= 1024 * MiB else f"{n // MiB} MiB"


def all_workloads(s: Sizes) -> list[Workload]:
    """Every workload for sizes *s*, in run order."""
    big_read = lambda c, z: layers.bigfile(c, z.seq_read_bytes)   # noqa: E731
    big_cu = lambda c, z: layers.bigfile(c, z.copyup_big_bytes)   # noqa: E731
    empty = lambda c, z: layers.empty(c)                          # noqa: E731
    w = [
        Workload("stat-tree", f"lstat all {s.tree_entries:,} entries (2 lowers)",
                 layers.tree, stat_tree, ("cold", "warm")),
        Workload("list-dir", f"list a {2 * s.list_per_lower:,}-entry dir merged from 2 lowers",
                 layers.bigdir, list_bigdir, ("cold", "warm")),
        Workload("read-big", f"sequential read of a {_fmt_bytes(s.seq_read_bytes)} lower file",
                 big_read, read_big, ("cold", "warm"), max_reps=3),
        Workload("read-small", f"read {s.small_read_count:,} small lower files",
                 layers.small, read_small, ("cold", "warm")),
        Workload("write-big", f"write a new {_fmt_bytes(s.write_bytes)} file, no fsync",
                 empty, write_big, mutating=True, max_reps=3),
        Workload("write-big-fsync", f"write a new {_fmt_bytes(s.write_bytes)} file + fsync",
                 empty, write_big_fsync, mutating=True, max_reps=3),
        Workload("create-small", f"create {s.create_count:,} small files",
                 empty, create_small, mutating=True),
        Workload("copyup-small", f"append to {s.copyup_small_count:,} lower files (copy-up)",
                 layers.small, copyup_small, mutating=True),
        Workload("copyup-big", f"append to one {_fmt_bytes(s.copyup_big_bytes)} lower file",
                 big_cu, copyup_big, mutating=True, max_reps=3),
        Workload("delete-tree", f"rm -rf a lower tree of "
                 f"{s.tree_delete_top * (1 + s.tree_sub * (1 + 2 * s.tree_files)):,} entries",
                 layers.tree, delete_tree, mutating=True),
        Workload("rename-small", f"rename {s.rename_count:,} lower files",
                 layers.small, rename_small, mutating=True),
        Workload("untar", "extract a tarball of the Python stdlib"
                 + (f" ({', '.join(s.tar_subdirs)})" if s.tar_subdirs else ""),
                 empty, untar, mutating=True),
        Workload("git-status", "git status in a stdlib repository in a lower",
                 layers.gitrepo, git_status, ("cold", "warm")),
        Workload("small-writes", f"{s.small_writes:,} 4-byte O_APPEND writes to a new file",
                 empty, small_writes, mutating=True, max_reps=3, ops=s.small_writes),
        Workload("mixed-load", f"{s.mixed_procs} processes x {s.mixed_ops:,} mixed operations "
                 "(create, append to lower, rename, unlink, readdir, stat, mmap read)",
                 layers.small, mixed_load, mutating=True, ops=s.mixed_procs * s.mixed_ops),
    ]
    for n in s.lookup_layers:
        w.append(Workload(f"lookup-{n}", f"lstat {s.lookup_count:,} bottom-layer names, "
                          f"{n} lowers", _lookup_fixture(n), lookup, ("cold", "cached"),
                          group="lookup", ops=s.lookup_count, extra={"layers": n}))
    for n in s.rss_walks:
        w.append(Workload(f"walk-{n}", f"walk + lstat {n:,} entries (daemon peak RSS)",
                          _walk_fixture(n), walk_tree, group="rss",
                          max_reps=1 if n >= 1_000_000 else 3, extra={"entries": n}))
    return w
