"""Operation model for the differential tests.

The kernel's overlayfs is the oracle: the same sequence of operations is applied to a kernel
overlay and to the system under test over identical lower layers, and every outcome must match.
This module holds the parts that do not mount anything: the lower-layer template, the operations
(as plain data, so that hypothesis can print a shrunk sequence as a readable reproducer), the
code that applies one operation to a mounted tree and normalises its result, and a tree snapshot
that can be compared between two mounts whose raw inode numbers and timestamps differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Sequence, TypeVar

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

# Every entry of the lower template gets this mtime, so a copy-up that loses times shows up.
FIXED_NS = 1_000_000_000 * 10**9
# Explicit times the `utime` operation sets (one with a non-zero nanosecond part).
UTIME_NS = (1_111_111_111 * 10**9, 1_234_567_890 * 10**9 + 123_456_789)
KNOWN_NS = frozenset((FIXED_NS, *UTIME_NS))

# A symlink target that cannot resolve to anything on the host (its parent does not exist), so an
# operation that follows it can never touch a file outside the layers.
OUTSIDE = "/nonexistent-overlayfuse-diff/target"

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")

# Triage knob, empty by default: OVF_DIFF_IGNORE=dirnlink,xwhiteout,... hides one known
# difference so that a run can find the next one. Never set it in CI.
#   dirnlink   - directory link counts (the kernel reports 1 for merged directories)
#   xwhiteout  - leave the xattr-whiteout form out of the lower template
#   dirmtime   - directory mtimes
#   privxattr  - do not set trusted.overlay.* names through the mount
#   hardlinks  - hl1 and hl2 are two files in the template, not one inode (use with op=link)
#   KEY        - any other snapshot key (e.g. ino, mtime, xattrs) is left out of comparisons
#   op=KIND    - operation KIND is not generated
#   E1=E2      - errno E2 counts as E1 in outcomes
IGNORE = frozenset(filter(None, os.environ.get("OVF_DIFF_IGNORE", "").split(",")))
_SAME_ERRNO = dict(reversed(i.split("=", 1)) for i in IGNORE if "=" in i and not i.startswith("op="))


# The system under test: overlayfuse is the committed default; OVF_DIFF_SUT=fuse-overlayfs or
# OVF_DIFF_SUT=kernel run the same harness against fuse-overlayfs or the kernel itself (how the
# harness proves itself).
SUT = os.environ.get("OVF_DIFF_SUT", "overlayfuse")


def sut_mount(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
              extra: Sequence[str] = ()) -> ContextManager[Any]:
    """Mount the system under test; every choice unmounts on exit, even on failure.  ``extra``
    overlay options (such as ``userxattr``) reach overlayfuse only."""
    import mounts  # the fixtures module; imported late so this module stays mount-free to import

    if SUT == "overlayfuse":
        return mounts.overlayfuse_mount(lowers, upper, work, mnt, extra=tuple(extra))
    if SUT == "fuse-overlayfs":
        return mounts.fuse_overlayfs_mount(lowers, upper, work, mnt)
    if SUT == "kernel":
        return mounts.kernel_overlay(lowers, upper, work, mnt)
    raise ValueError(f"OVF_DIFF_SUT={SUT!r}: expected overlayfuse, fuse-overlayfs or kernel")


# --------------------------------------------------------------------------- random runs

# The randomised runs (marked slow) draw a new seed for each session unless OVF_RANDOM_SEED
# gives one: the derandomized runs replay the same examples forever, these look further.
RANDOM_SEED = int(os.environ.get("OVF_RANDOM_SEED") or random.SystemRandom().getrandbits(32))
_T = TypeVar("_T", bound=Callable[..., Any])


def random_run(budget_var: str, default: int, *health: HealthCheck) -> Callable[[_T], _T]:
    """Settings and seed for a randomised hypothesis run of ``budget_var`` examples (CI sets
    more than the default).  No example database: a fresh clone has none, and a stale one must
    not turn a random run into a replay."""
    budget = int(os.environ.get(budget_var, str(default)))
    run_settings = settings(
        max_examples=budget, deadline=None, derandomize=False, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *health],
        report_multiple_bugs=False, print_blob=True,
    )

    def decorate(test: _T) -> _T:
        return run_settings(seed(RANDOM_SEED)(test))

    return decorate


@contextlib.contextmanager
def seed_note(budget_var: str) -> Iterator[None]:
    """On failure, say how to run the same random examples again."""
    try:
        yield
    except BaseException as e:
        budget = os.environ.get(budget_var, "its default")
        e.add_note(f"random run: OVF_RANDOM_SEED={RANDOM_SEED} with {budget_var}={budget} "
                   "draws the same examples again")
        raise


# --------------------------------------------------------------------------- lower template

def _whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))


def _file(path: Path, data: bytes = b"", mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def build_lowers(base: Path) -> list[Path]:
    """Write the two lower layers (top first) that every example starts from.

    Why this shape: each entry exercises one rule of the format or of copy-up (a merged dir, a
    whiteout, an opaque dir, an xattr whiteout, a hard-linked pair, symlinks, a fifo, xattrs,
    odd modes and owners), and the names are the ones the operation pool draws from, so that the
    generated operations collide with them often.
    """
    top, bottom = base / "l1", base / "l2"
    for d in (top, bottom):
        d.mkdir(parents=True)

    # bottom layer
    _file(bottom / "f1", b"f1 from bottom\n")
    _file(bottom / "w", b"whited out by the top layer\n")
    (bottom / "m").mkdir()
    _file(bottom / "m" / "x", b"m/x bottom\n")
    _file(bottom / "m" / "y", b"m/y bottom, whited out\n")
    (bottom / "o").mkdir()
    _file(bottom / "o" / "hidden", b"hidden by opaque o\n")
    (bottom / "d" / "e").mkdir(parents=True)
    _file(bottom / "d" / "e" / "f", b"deep\n", 0o640, (1000, 1000))
    (bottom / "dm" / "sub").mkdir(parents=True)
    _file(bottom / "dm" / "a", b"dm/a\n")
    _file(bottom / "dm" / "sub" / "q", b"dm/sub/q\n")
    (bottom / "xw").mkdir()
    _file(bottom / "xw" / "gone", b"removed by an xattr whiteout\n")
    _file(bottom / "xw" / "keep", b"xw/keep\n")

    # top layer
    (top / "m").mkdir()
    _file(top / "m" / "z", b"m/z top\n", 0o600)
    _whiteout(top / "m" / "y")
    _whiteout(top / "w")
    (top / "o").mkdir()
    os.setxattr(top / "o", "trusted.overlay.opaque", b"y")
    _file(top / "o" / "vis", b"o/vis\n")
    (top / "xw").mkdir()
    if "xwhiteout" not in IGNORE:
        os.setxattr(top / "xw", "trusted.overlay.opaque", b"x")
        _file(top / "xw" / "gone", b"")
        os.setxattr(top / "xw" / "gone", "trusted.overlay.whiteout", b"y")
    _file(top / "hl1", b"hard-linked pair\n", 0o664, (1000, 100))
    if "hardlinks" in IGNORE:
        _file(top / "hl2", b"hard-linked pair\n", 0o664, (1000, 100))
    else:
        os.link(top / "hl1", top / "hl2")
    os.symlink("f1", top / "s_rel")
    os.symlink(OUTSIDE, top / "s_abs")
    os.symlink("m", top / "s_dir")
    os.mkfifo(top / "p", 0o640)
    _file(top / "e", b"", 0o600, (1000, 1000))
    _file(top / "xf", b"file with xattrs\n")
    os.setxattr(top / "xf", "user.foo", b"bar")
    os.setxattr(top / "xf", "trusted.k", b"tv")
    _file(top / "su", b"#!/bin/sh\n", 0o4755)
    (top / "rd").mkdir(mode=0o555)
    os.chmod(top / "rd", 0o555)
    _file(top / "rd" / "r", b"in a 0555 dir\n", 0o444)

    # fixed times everywhere, children before their directories
    for layer in (top, bottom):
        for dirpath, dirnames, filenames in os.walk(layer, topdown=False):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), ns=(FIXED_NS, FIXED_NS), follow_symlinks=False)
        os.utime(layer, ns=(FIXED_NS, FIXED_NS))
    return [top, bottom]


# --------------------------------------------------------------------------- operations

@dataclass(frozen=True)
class Op:
    """One filesystem operation, as data: `kind` names the call, `args` its arguments."""

    kind: str
    args: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"{self.kind}{self.args!r}" if len(self.args) != 1 else f"{self.kind}({self.args[0]!r})"


# Paths collide on purpose: existing entries of both layers, hidden ones, and a few new names.
PATHS = (
    "f1", "w", "m", "o", "d", "dm", "xw", "hl1", "hl2", "s_rel", "s_abs", "s_dir", "p", "e",
    "xf", "su", "rd", "n1", "n2", "nd",
    "m/x", "m/y", "m/z", "m/n1", "o/hidden", "o/vis", "o/n1", "d/e", "d/e/f", "dm/a",
    "dm/sub", "dm/sub/q", "xw/gone", "xw/keep", "rd/r", "nd/n1", "n1/n2", "f1/n1",
)
DIRISH = ("m", "o", "d", "dm", "xw", "rd", "nd", "n1", "d/e", "dm/sub", "m/n1", "o/n1")
DATA = (b"", b"A", b"hello world\n", b"Z" * 5000)
OFFSETS = (0, 1, 7, 5000)
MODES = (0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000)
OWNERS = ((0, 0), (1000, 1000), (1001, -1), (-1, 100))
TARGETS = ("f1", "m/x", "../f1", "m", OUTSIDE, "n1", "dangling")
# The kernel (6.7+) lets a caller set trusted.overlay.* names through a mount: it stores them
# escaped (trusted.overlay.overlay.*) for nested overlays and shows them back. USER_PRIVATE is
# such a name; it is no marker, so the marker check exempts exactly it.
USER_PRIVATE = "trusted.overlay.zz"
XATTR_SET = ("user.k1", "user.foo", "trusted.k") + (() if "privxattr" in IGNORE else (USER_PRIVATE,))
XATTR_GET = ("user.k1", "user.foo", "trusted.k", USER_PRIVATE, "trusted.overlay.opaque",
             "trusted.overlay.origin")
XATTR_VALUES = (b"v1", b"", b"x" * 100)
FD_MODES = ("r", "rw", "a")
SLOTS = (0, 1)

_path = st.sampled_from(PATHS)
_dirpath = st.sampled_from(DIRISH)
_data = st.sampled_from(DATA)


def _op(kind: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    return st.tuples(*args).map(lambda a: Op(kind, a))


def _operations(path: st.SearchStrategy[str], dirpath: st.SearchStrategy[str]
                ) -> st.SearchStrategy[Op]:
    """Every operation kind (less those OVF_DIFF_IGNORE leaves out), on paths from ``path``
    and directory paths from ``dirpath``."""
    anypath = st.one_of(path, dirpath)
    kinds: dict[str, tuple[st.SearchStrategy[Any], ...]] = {
        "read": (path,),
        "write": (path, st.sampled_from(OFFSETS), _data),
        "append": (path, _data),
        "open_trunc": (path,),
        "create_excl": (path, _data),
        "create": (path, _data),
        "truncate": (path, st.sampled_from((0, 3, 9000))),
        "mkdir": (anypath, st.sampled_from((0o755, 0o700))),
        "rmdir": (anypath,),
        "unlink": (path,),
        "rename": (anypath, anypath, st.sampled_from((0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))),
        "link": (path, path),
        "symlink": (st.sampled_from(TARGETS), path),
        "readlink": (path,),
        "mkfifo": (path,),
        "chmod": (path, st.sampled_from(MODES)),
        "chown": (path, st.sampled_from(OWNERS), st.booleans()),
        "utime": (path, st.sampled_from((None, *UTIME_NS))),
        # XATTR_CREATE/REPLACE: pyfuse3 answers a failing flag check itself, before the daemon
        # sees the call, so the kernel's copy-up ahead of that failure (visible only as a
        # parent's link count turning merged) cannot be matched; the flags' results are
        # compared in test_semantics.py::test_user_xattrs instead.
        "setxattr": (path, st.sampled_from(XATTR_SET), st.sampled_from(XATTR_VALUES),
                     st.just(0)),
        "getxattr": (path, st.sampled_from(XATTR_GET)),
        "listxattr": (path,),
        "removexattr": (path, st.sampled_from(XATTR_SET)),
        "listdir": (st.one_of(dirpath, path),),
        "stat": (path, st.booleans()),
        "fd_open": (st.sampled_from(SLOTS), path, st.sampled_from(FD_MODES)),
        "fd_read": (st.sampled_from(SLOTS),),
        "fd_write": (st.sampled_from(SLOTS), st.sampled_from((0, 3)), _data),
        "fd_fstat": (st.sampled_from(SLOTS),),
        "fd_close": (st.sampled_from(SLOTS),),
    }
    return st.one_of([_op(k, *args) for k, args in kinds.items() if f"op={k}" not in IGNORE])


OPERATIONS: st.SearchStrategy[Op] = _operations(_path, _dirpath)


def op_sequences(max_size: int = 25) -> st.SearchStrategy[list[Op]]:
    """Sequences of operations; short enough that a mismatch shrinks to a readable reproducer."""
    return st.lists(OPERATIONS, min_size=1, max_size=max_size)


@st.composite
def random_sequences(draw: st.DrawFn) -> list[Op]:
    """Longer sequences, most of whose operations meet on a few paths: what the randomised
    runs draw.

    Hypothesis's lists average about six elements, and with 38 paths two operations of such a
    sequence seldom touch the same one, where bugs live (change a lower file, then remove it:
    three runs of 100 plain examples missed a whiteout left out on such an unlink).  Here a
    sequence picks up to three paths (or none: then all paths are alike), three in four of its
    paths come from those, and it is a few runs of operations one after the other (a list of
    lists: about 20 operations, and a failure still shrinks by dropping runs or operations).
    """
    chosen = draw(st.lists(st.sampled_from(PATHS + DIRISH), max_size=3, unique=True))
    path, dirpath = _path, _dirpath
    if chosen:
        focus = st.sampled_from(chosen)
        path = st.tuples(st.integers(0, 3), focus, _path).map(lambda t: t[2] if t[0] == 3 else t[1])
        dirpath = st.one_of(focus, _dirpath)
    runs = draw(st.lists(st.lists(_operations(path, dirpath), min_size=1, max_size=12),
                         min_size=1, max_size=8))
    return [op for run in runs for op in run]


# --------------------------------------------------------------------------- applying

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    """rename(2) with flags; Python has no binding for renameat2."""
    res = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


class InoTokens:
    """Maps raw inode numbers to tokens in order of first sight.

    Two mounts never share raw inode numbers, but which names share an inode (hard links) and
    whether a name keeps its inode over time (copy-up, rename, remount) must agree: comparing
    tokens compares exactly those equalities.
    """

    def __init__(self) -> None:
        self._map: dict[int, str] = {}

    def __call__(self, ino: int) -> str:
        return self._map.setdefault(ino, f"i{len(self._map)}")


def file_type(mode: int) -> str:
    """One letter for the file type, as `ls -l` shows it."""
    for test, letter in ((stat.S_ISREG, "-"), (stat.S_ISDIR, "d"), (stat.S_ISLNK, "l"),
                         (stat.S_ISFIFO, "p"), (stat.S_ISCHR, "c"), (stat.S_ISBLK, "b"),
                         (stat.S_ISSOCK, "s")):
        if test(mode):
            return letter
    return "?"


def time_class(ns: int) -> int | str:
    """An mtime is compared only where the test knows it: fixed in the template or set by utime."""
    return ns if ns in KNOWN_NS else "other"


def _ignored(key: str, kind: str) -> bool:
    return key in IGNORE or (kind == "d" and f"dir{key}" in IGNORE)


def stat_record(st_: os.stat_result, tokens: InoTokens) -> tuple[Any, ...]:
    """The stat fields that are meaningful across two different mounts.

    Directory sizes are left out (they depend on the backing filesystem's directory format).
    """
    kind = file_type(st_.st_mode)
    return (
        kind,
        oct(stat.S_IMODE(st_.st_mode)),
        None if kind == "d" else st_.st_size,
        None if _ignored("nlink", kind) else st_.st_nlink,
        st_.st_uid,
        st_.st_gid,
        None if _ignored("mtime", kind) else time_class(st_.st_mtime_ns),
        None if _ignored("ino", kind) else tokens(st_.st_ino),
        os.major(st_.st_rdev) if kind in "cb" else None,
        os.minor(st_.st_rdev) if kind in "cb" else None,
    )


@dataclass
class Ctx:
    """Per-mount state while a sequence runs: the mount point, open fds, inode tokens."""

    root: str
    fds: dict[int, int] = field(default_factory=dict)
    tokens: InoTokens = field(default_factory=InoTokens)

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def close_all(self) -> None:
        for slot in list(self.fds):
            os.close(self.fds.pop(slot))


Outcome = tuple[Any, ...]

# O_NONBLOCK everywhere: opening a fifo must never block the test.
_NB = os.O_NONBLOCK | os.O_CLOEXEC
_READ_MAX = 1 << 16


def _with_fd(path: str, flags: int, fn: Any, mode: int = 0o644) -> Any:
    fd = os.open(path, flags | _NB, mode)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> int:
    return os.write(fd, data) if data else 0


def _do(op: Op, c: Ctx) -> Any:
    a = op.args
    k = op.kind
    if k == "read":
        return _with_fd(c.p(a[0]), os.O_RDONLY, lambda fd: os.read(fd, _READ_MAX))
    if k == "write":
        return _with_fd(c.p(a[0]), os.O_WRONLY, lambda fd: os.pwrite(fd, a[2], a[1]) if a[2] else 0)
    if k == "append":
        return _with_fd(c.p(a[0]), os.O_WRONLY | os.O_APPEND, lambda fd: _write_all(fd, a[1]))
    if k == "open_trunc":
        return _with_fd(c.p(a[0]), os.O_WRONLY | os.O_TRUNC, lambda fd: None)
    if k == "create_excl":
        return _with_fd(c.p(a[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, lambda fd: _write_all(fd, a[1]))
    if k == "create":
        return _with_fd(c.p(a[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, lambda fd: _write_all(fd, a[1]))
    if k == "truncate":
        return os.truncate(c.p(a[0]), a[1])
    if k == "mkdir":
        return os.mkdir(c.p(a[0]), a[1])
    if k == "rmdir":
        return os.rmdir(c.p(a[0]))
    if k == "unlink":
        return os.unlink(c.p(a[0]))
    if k == "rename":
        return renameat2(c.p(a[0]), c.p(a[1]), a[2])
    if k == "link":
        return os.link(c.p(a[0]), c.p(a[1]), follow_symlinks=False)
    if k == "symlink":
        return os.symlink(a[0], c.p(a[1]))
    if k == "readlink":
        return os.readlink(c.p(a[0]))
    if k == "mkfifo":
        return os.mkfifo(c.p(a[0]), 0o640)
    if k == "chmod":
        return os.chmod(c.p(a[0]), a[1])
    if k == "chown":
        return os.chown(c.p(a[0]), a[1][0], a[1][1], follow_symlinks=a[2])
    if k == "utime":
        ns = None if a[1] is None else (a[1], a[1])
        return os.utime(c.p(a[0]), ns=ns) if ns else os.utime(c.p(a[0]))
    if k == "setxattr":
        return os.setxattr(c.p(a[0]), a[1], a[2], a[3], follow_symlinks=False)
    if k == "getxattr":
        return os.getxattr(c.p(a[0]), a[1], follow_symlinks=False)
    if k == "listxattr":
        return sorted(os.listxattr(c.p(a[0]), follow_symlinks=False))
    if k == "removexattr":
        return os.removexattr(c.p(a[0]), a[1], follow_symlinks=False)
    if k == "listdir":
        with os.scandir(c.p(a[0])) as it:
            return sorted((e.name, _dirent_type(e)) for e in it)
    if k == "stat":
        return stat_record(os.stat(c.p(a[0]), follow_symlinks=a[1]), c.tokens)
    if k == "fd_open":
        slot, path, mode = a
        if slot in c.fds:
            os.close(c.fds.pop(slot))
        flags = {"r": os.O_RDONLY, "rw": os.O_RDWR, "a": os.O_WRONLY | os.O_APPEND}[mode]
        c.fds[slot] = os.open(c.p(path), flags | _NB)
        return None
    if k in ("fd_read", "fd_write", "fd_fstat", "fd_close"):
        fd = c.fds.get(a[0])
        if fd is None:
            return "no-fd"
        if k == "fd_read":
            return os.pread(fd, _READ_MAX, 0)
        if k == "fd_write":
            return os.pwrite(fd, a[2], a[1]) if a[2] else 0
        if k == "fd_fstat":
            return stat_record(os.fstat(fd), c.tokens)
        os.close(c.fds.pop(a[0]))
        return None
    raise ValueError(f"unknown operation {k}")


def _dirent_type(e: os.DirEntry[str]) -> str:
    if e.is_symlink():
        return "l"
    if e.is_dir(follow_symlinks=False):
        return "d"
    if e.is_file(follow_symlinks=False):
        return "-"
    return "o"


def apply(op: Op, c: Ctx) -> Outcome:
    """Run one operation on a mount; ("ok", result) or ("err", errno name)."""
    try:
        return ("ok", _do(op, c))
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return ("err", _SAME_ERRNO.get(name, name))


# --------------------------------------------------------------------------- snapshots

@dataclass
class Snapshot:
    """A merged tree as comparable data, plus the raw inode numbers (for remount stability)."""

    entries: dict[str, dict[str, Any]]
    raw_ino: dict[str, int]


def snapshot_tree(root: str | Path) -> Snapshot:
    """Walk a tree without following symlinks and record what must agree between two mounts.

    Per entry: type, mode, owner, size and nlink (files), content, symlink target, device
    numbers, all xattrs visible, mtime where known, which paths share its inode, and
    whether the inode number `readdir` reported equals the one `lstat` reports.
    """
    root = str(root)
    entries: dict[str, dict[str, Any]] = {}
    raw: dict[str, int] = {}
    dino: dict[str, int] = {}

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        with os.scandir(full) as it:
            children = sorted(it, key=lambda e: e.name)
        for e in children:
            crel = f"{rel}/{e.name}" if rel else e.name
            dino[crel] = e.inode()
            record(crel)
            if stat.S_ISDIR(os.lstat(os.path.join(root, crel)).st_mode):
                walk(crel)

    def record(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        s = os.lstat(full)
        kind = file_type(s.st_mode)
        ent: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(s.st_mode)),
            "uid": s.st_uid,
            "gid": s.st_gid,
            "nlink": s.st_nlink,
            "mtime": time_class(s.st_mtime_ns),
        }
        if kind != "d":
            ent["size"] = s.st_size
        if kind == "-":
            with open(full, "rb") as f:
                ent["data"] = f.read()
        elif kind == "l":
            ent["target"] = os.readlink(full)
        elif kind in "cb":
            ent["rdev"] = (os.major(s.st_rdev), os.minor(s.st_rdev))
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError as exc:
            ent["xattrs"] = errno.errorcode.get(exc.errno, exc.errno)
        else:
            xs = {}
            for n in sorted(names):
                try:
                    xs[n] = os.getxattr(full, n, follow_symlinks=False)
                except OSError as exc:
                    xs[n] = errno.errorcode.get(exc.errno, exc.errno)
            ent["xattrs"] = xs
        raw[rel] = s.st_ino
        entries[rel or "."] = ent

    record("")
    walk("")
    # Inode identity as "the first path (sorted) with this inode": hard links name each other,
    # and one differing identity does not shift every later token.
    first: dict[int, str] = {}
    for rel in sorted(raw):
        (entries[rel or "."])["ino"] = first.setdefault(raw[rel], rel or ".")
        if rel in dino:
            entries[rel]["dirent_ino_matches_stat"] = dino[rel] == raw[rel]
    return Snapshot(entries, raw)


def overlay_markers(snap: Snapshot) -> list[str]:
    """Overlay internals visible through a mount: whiteout names, 0/0 devices, private xattrs."""
    bad = []
    for rel, ent in snap.entries.items():
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".wh."):
            bad.append(f"{rel}: whiteout name visible")
        if ent.get("rdev") == (0, 0) and ent["type"] == "c":
            bad.append(f"{rel}: whiteout device visible")
        if isinstance(ent.get("xattrs"), dict):
            for n in ent["xattrs"]:
                if n.startswith(PRIVATE_XATTR_PREFIXES) and n != USER_PRIVATE:
                    bad.append(f"{rel}: private xattr {n} visible")
    return bad


def diff_snapshots(a: Snapshot, b: Snapshot, a_name: str = "kernel", b_name: str = "sut") -> list[str]:
    """Human-readable differences between two snapshots (empty when they agree)."""
    out = []
    for rel in sorted(set(a.entries) | set(b.entries)):
        ea, eb = a.entries.get(rel), b.entries.get(rel)
        if ea is None or eb is None:
            out.append(f"{rel}: only in {a_name if eb is None else b_name}")
            continue
        for key in sorted(set(ea) | set(eb)):
            if _ignored(key, ea["type"]):
                continue
            va, vb = ea.get(key), eb.get(key)
            if va != vb:
                if key == "data":
                    va, vb = _short(va), _short(vb)
                out.append(f"{rel}: {key}: {a_name}={va!r} {b_name}={vb!r}")
    return out


def _short(v: Any) -> Any:
    if isinstance(v, bytes) and len(v) > 40:
        return v[:20] + b"..." + v[-10:] + f" ({len(v)} bytes)".encode()
    return v


def raw_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a layer directory on disk, to prove a mount left it untouched."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + [""]:
            full = os.path.join(dirpath, name) if name else dirpath
            s = os.lstat(full)
            data = b""
            if stat.S_ISREG(s.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
            xs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False))
                              for n in os.listxattr(full, follow_symlinks=False)))
            out[os.path.relpath(full, root)] = (s.st_mode, s.st_uid, s.st_gid, s.st_nlink,
                                                s.st_mtime_ns, s.st_ino, data, xs)
    return out
