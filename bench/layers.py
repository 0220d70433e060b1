"""Lower layers for the benchmark: built once, cached, identical for every system and run.

Lowers are never written through an overlay (only uppers are), so one cached copy serves every
run; each run gets a fresh empty upper and work dir instead (see systems.py). The ``merged``
directory is the floor system ``raw``: the same content in a plain directory, copied from the
lowers (bottom layer first, so the top one wins).
A fixture is complete only when its stamp file exists, so an interrupted build is redone.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.sizes import MiB, Sizes

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/tmp/overlayfuse-bench")
STDLIB = Path("/usr/lib/python3.11")
STAMP = ".bench-complete"
FORMAT = 2  # bump when a builder changes what it produces


@dataclass
class Fixture:
    """Cached layers: lowers top first, the merged plain copy, and facts the workloads need."""

    name: str
    root: Path
    lowers: list[Path]
    merged: Path
    info: dict[str, Any] = field(default_factory=dict)


def _mkfiles(dirpath: Path, names: list[str], data: bytes | None = None) -> None:
    """Create files fast: mknod for empty ones, relative to one dir fd (no path walks)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if data is None:
            for n in names:
                os.mknod(n, 0o644 | stat.S_IFREG, dir_fd=dfd)
        else:
            for n in names:
                fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
    finally:
        os.close(dfd)


def _write_big(path: Path, nbytes: int) -> None:
    """*nbytes* of incompressible data (1 MiB random blocks, each stamped with its index)."""
    block = bytearray(os.urandom(MiB))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left, i = nbytes, 0
        while left > 0:
            block[:8] = i.to_bytes(8, "little")
            left -= os.write(fd, block[:min(left, MiB)])
            i += 1
        os.fsync(fd)
    finally:
        os.close(fd)


def _run(argv: list[str], cwd: Path | None = None) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost", LC_ALL="C")
    r = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def _merge(lowers: list[Path], merged: Path) -> None:
    """Copy the lowers into *merged*, bottom first so upper layers win.

    A real copy, not hard links: a link count of 2 on every lower file would make the
    overlays treat each one as a hard link (index, copy-up on unlink) and skew the results.
    """
    merged.mkdir(parents=True, exist_ok=True)
    for low in reversed(lowers):
        _run(["cp", "-a", "--remove-destination", f"{low}/.", f"{merged}/"])


def _cached(cache: Path, name: str, params: dict[str, Any], n_lowers: int,
            build: Callable[[list[Path]], dict[str, Any]],
            after_merge: Callable[[list[Path], Path], None] | None = None) -> Fixture:
    """Return fixture *name*, building it under *cache* unless a complete copy exists."""
    root = cache / "layers" / name
    lowers = [root / f"lower{i}" for i in range(n_lowers)]
    merged = root / "merged"
    stamp = root / STAMP
    want = {"format": FORMAT, **params}
    if stamp.exists():
        try:
            got = json.loads(stamp.read_text())
            if got.get("params") == want:
                return Fixture(name, root, lowers, merged, got.get("info", {}))
        except (OSError, ValueError):
            pass
    if root.exists():
        shutil.rmtree(root)
    t0 = time.monotonic()
    log.info("building fixture %s", name)
    for d in lowers:
        d.mkdir(parents=True)
    info = build(lowers)
    _merge(lowers, merged)
    if after_merge is not None:
        after_merge(lowers, merged)
    stamp.write_text(json.dumps({"params": want, "info": info}))
    log.info("built fixture %s in %.1fs", name, time.monotonic() - t0)
    return Fixture(name, root, lowers, merged, info)


# ---------------------------------------------------------------------------------------------
# the fixtures


def tree(cache: Path, s: Sizes) -> Fixture:
    """~50,000 entries over 2 lowers: the same dirs in both, different files in each."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        for li, low in enumerate(lowers):
            names = [f"{'ab'[li]}{k:03d}" for k in range(s.tree_files)]
            for t in range(s.tree_top):
                for u in range(s.tree_sub):
                    _mkfiles(low / f"d{t:02d}" / f"s{u:02d}", names)
        return {"entries": s.tree_entries,
                "delete": [f"d{t:02d}" for t in range(s.tree_delete_top)],
                "delete_entries": s.tree_delete_top * (1 + s.tree_sub * (1 + 2 * s.tree_files))}
    return _cached(cache, f"tree-{s.tree_top}x{s.tree_sub}x{s.tree_files}",
                   {"top": s.tree_top, "sub": s.tree_sub, "files": s.tree_files}, 2, build)


def bigdir(cache: Path, s: Sizes) -> Fixture:
    """One directory whose listing is merged from 2 lowers."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        for li, low in enumerate(lowers):
            _mkfiles(low / "big", [f"{'xy'[li]}{k:06d}" for k in range(s.list_per_lower)])
        return {"entries": 2 * s.list_per_lower}
    return _cached(cache, f"bigdir-{s.list_per_lower}", {"n": s.list_per_lower}, 2, build)


def bigfile(cache: Path, nbytes: int) -> Fixture:
    """One large file in the top lower (sequential read, big copy-up)."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        _write_big(lowers[0] / "big.bin", nbytes)
        (lowers[1] / "other").write_text("other layer\n")
        return {"file": "big.bin", "bytes": nbytes}
    return _cached(cache, f"bigfile-{nbytes // MiB}m", {"bytes": nbytes}, 2, build)


def small(cache: Path, s: Sizes) -> Fixture:
    """Small files over 2 lowers (reads, copy-up by append, renames)."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        files: list[str] = []
        for li, low in enumerate(lowers):
            for d in range(s.small_dirs):
                names = [f"{'ab'[li]}{k:03d}" for k in range(s.small_files)]
                _mkfiles(low / f"s{d:02d}", names, os.urandom(s.small_size))
                files += [f"s{d:02d}/{n}" for n in names]
        # interleave the layers so any slice of the list touches both
        half = len(files) // 2
        mixed = [p for pair in zip(files[:half], files[half:]) for p in pair]
        return {"files": mixed}
    return _cached(cache, f"small-{s.small_dirs}x{s.small_files}x{s.small_size}",
                   {"d": s.small_dirs, "f": s.small_files, "b": s.small_size}, 2, build)


def empty(cache: Path) -> Fixture:
    """Two nearly empty lowers: the workloads that only write new files."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        (lowers[0] / "top").write_text("top layer\n")
        (lowers[1] / "bottom").write_text("bottom layer\n")
        return {}
    return _cached(cache, "empty", {}, 2, build)


def _stdlib_paths(s: Sizes) -> list[str]:
    return [f"{STDLIB.name}/{d}" for d in s.tar_subdirs] if s.tar_subdirs else [STDLIB.name]


def stdlib_tar(cache: Path, s: Sizes) -> Path:
    """A tarball of the Python standard library (or a small part of it for --quick), cached."""
    tag = "-".join(s.tar_subdirs) or "all"
    path = cache / f"stdlib-{tag}.tar"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        _run(["tar", "-cf", str(tmp), "-C", str(STDLIB.parent), *_stdlib_paths(s)])
        tmp.rename(path)
    return path


def gitrepo(cache: Path, s: Sizes) -> Fixture:
    """A git repository (a committed copy of the stdlib) living in the top lower."""
    def build(lowers: list[Path]) -> dict[str, Any]:
        repo = lowers[0] / "repo"
        repo.mkdir()
        _run(["tar", "-xf", str(stdlib_tar(cache, s)), "-C", str(repo)])
        _run(["git", "init", "-q"], repo)
        _run(["git", "add", "-A"], repo)
        _run(["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "stdlib"], repo)
        (lowers[1] / "other").write_text("other layer\n")
        n = sum(len(f) for _, _, f in os.walk(repo))
        return {"repo": "repo", "files": n}

    def refresh(lowers: list[Path], merged: Path) -> None:
        # the copy has new inodes: refresh both indexes once the clock moved on, so that
        # `git status` starts from a clean, non-racy index everywhere
        time.sleep(1.1)
        for r in (lowers[0] / "repo", merged / "repo"):
            _run(["git", "status", "--porcelain"], r)

    tag = "-".join(s.tar_subdirs) or "all"
    return _cached(cache, f"git-{tag}", {"tar": list(s.tar_subdirs)}, 2, build, refresh)


def lookup_layers(cache: Path, s: Sizes, n: int) -> Fixture:
    """*n* lowers whose directory ``d`` exists in all; the looked-up files are in the bottom.

    The filler layers are shared by every *n* (built once for the largest), so only the small
    merged copy is per *n*.
    """
    count = 2 * s.lookup_count
    base = cache / "layers" / f"lookup-base-{count}"
    nmax = max(s.lookup_layers)
    stamp = base / STAMP
    want = json.dumps({"format": FORMAT, "count": count, "nmax": nmax})
    if not stamp.exists() or stamp.read_text() != want:
        if base.exists():
            shutil.rmtree(base)
        for i in range(nmax - 1):
            _mkfiles(base / f"{i:03d}" / "d", [f"g{i:03d}a", f"g{i:03d}b"])
            _mkfiles(base / f"{i:03d}" / f"own{i:03d}", ["x"])
        _mkfiles(base / "target" / "d", [f"f{k:05d}" for k in range(count)])
        stamp.write_text(want)
    lowers = [base / f"{i:03d}" for i in range(n - 1)] + [base / "target"]

    def build(_: list[Path]) -> dict[str, Any]:
        return {}
    fx = _cached(cache, f"lookup-{n}-{count}-{nmax}", {"n": n, "count": count, "nmax": nmax}, 0,
                 build, lambda _l, m: _merge(lowers, m))
    fx.lowers = lowers
    fx.info = {"layers": n, "names": [f"d/f{k:05d}" for k in range(count)]}
    return fx


def walk(cache: Path, entries: int) -> Fixture:
    """*entries* empty files over 2 lowers (same dirs of 1,000 files in both): the RSS walk."""
    per_lower = entries // 2
    ndirs = max(1, per_lower // 1000)
    per_dir = per_lower // ndirs

    def build(lowers: list[Path]) -> dict[str, Any]:
        for li, low in enumerate(lowers):
            names = [f"{'ab'[li]}{k:04d}" for k in range(per_dir)]
            for d in range(ndirs):
                _mkfiles(low / f"w{d:04d}", names)
        return {"entries": ndirs + 2 * ndirs * per_dir}
    return _cached(cache, f"walk-{entries}", {"entries": entries}, 2, build)
