"""Layers that contain symlinks pointing outside them: nothing done through the mount may read
or write outside the layers, and the overlay's own xattrs stay out of the caller's hands.

The daemon resolves every backing path relative to directory fds with O_NOFOLLOW; these tests
hold it to that from the outside. Each scenario runs on the kernel overlay and on overlayfuse
and expects one result table from both (the kernel is the oracle), plus an untouched outside
dir: same names, bytes, modes, owners, times (mtime and ctime) and xattrs.

Links whose target is relative are built so that they reach the outside dir only when resolved
*inside a layer*; resolved from the mount point they lead nowhere (the mount sits at another
depth). A caller following them through the mount therefore gets ENOENT, and anything that
reaches the outside dir must have been the daemon following a link on the backing side.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import outcome
from mounts import Layers, kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlays need root")

SYSTEMS = ("kernel", "overlayfuse")
SECRET = b"TOP SECRET: outside the layers\n"


@pytest.fixture(params=SYSTEMS)
def system(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def mounted(system: str, layers: Layers) -> Iterator[Path]:
    cm = (kernel_overlay if system == "kernel" else overlayfuse_mount)(
        layers.lowers, layers.upper, layers.work, layers.mnt)
    with cm:
        yield layers.mnt


def read(p: Path) -> bytes:
    return p.read_bytes()


def write(p: Path, data: bytes = b"written through the mount\n") -> None:
    p.write_bytes(data)


def listing(p: Path) -> list[str]:
    return sorted(os.listdir(p))


class World:
    """A layer set one level deeper than the mount point, and a dir outside both."""

    def __init__(self, tmp: Path, n_lowers: int) -> None:
        self.root = tmp / "w"
        base = make_layers(self.root / "L", n_lowers)
        self.mnt = self.root / "mnt"
        self.mnt.mkdir()
        self.layers = Layers(base.root, base.lowers, base.upper, base.work, self.mnt)
        self.outside = self.root / "outside"
        (self.outside / "sub").mkdir(parents=True)
        (self.outside / "secret").write_bytes(SECRET)
        (self.outside / "sub" / "inner").write_bytes(SECRET)
        (self.outside / "f").write_bytes(SECRET)
        os.setxattr(self.outside / "secret", "user.tag", b"outside")
        self.before = fingerprint(self.outside)

    def rel(self, link_parent: Path) -> str:
        """A relative target reaching the outside dir from *link_parent* (inside a layer)."""
        return os.path.relpath(self.outside, link_parent)

    def check_outside(self) -> None:
        after = fingerprint(self.outside)
        diff = sorted(k for k in set(self.before) | set(after)
                      if self.before.get(k) != after.get(k))
        assert not diff, f"the outside dir changed: {diff} " \
                         f"{[(self.before.get(k), after.get(k)) for k in diff]}"


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything that a write, chmod, chown, utime, xattr change, create or delete alters."""
    out: dict[str, tuple[Any, ...]] = {}
    for d, dirs, files in os.walk(root):
        for n in [".", *dirs, *files]:
            p = os.path.join(d, n)
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() \
                if stat.S_ISREG(st.st_mode) else None
            xs = tuple(sorted((x, os.getxattr(p, x, follow_symlinks=False))
                              for x in os.listxattr(p, follow_symlinks=False)))
            out[os.path.normpath(os.path.relpath(p, root))] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                st.st_nlink, digest, xs)
    return out


def no_secret_visible(mnt: Path) -> None:
    """No file reachable through the mount (symlinks not followed) holds the outside data."""
    for d, dirs, files in os.walk(mnt):
        for n in files:
            p = Path(d) / n
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                assert p.read_bytes() != SECRET, f"{p} shows a file from outside the layers"


# ------------------------------------------------------------------------------- scenarios


def test_upper_symlink_over_lower_dir(system: str, tmp_path: Path) -> None:
    """The issue's case: an upper entry ``a -> /abs/outside`` over a lower dir ``a`` (and ``r``,
    the same with a relative target)."""
    w = World(tmp_path, 1)
    low, up = w.layers.lowers[0], w.layers.upper
    for n in ("a", "r"):
        (low / n).mkdir()
        (low / n / "f").write_bytes(b"lower file under the dir\n")
        (low / n / "secret").write_bytes(b"lower, not the outside one\n")
    os.symlink(w.outside, up / "a")
    os.symlink(w.rel(up), up / "r")
    with mounted(system, w.layers) as m:
        res = {
            "ls": listing(m),
            "type_a": stat.S_IFMT(os.lstat(m / "a").st_mode) == stat.S_IFLNK,
            "readlink_a": os.readlink(m / "a") == str(w.outside),
            "read r/f": outcome(read, m / "r/f"),
            "read r/secret": outcome(read, m / "r/secret"),
            "create r/new": outcome(write, m / "r/new"),
            "mkdir r/nd": outcome(os.mkdir, m / "r/nd"),
            "unlink r/f": outcome(os.unlink, m / "r/f"),
            "chmod r": outcome(os.chmod, m / "r", 0o777),
            "setxattr r": outcome(os.setxattr, m / "r", "user.x", b"1"),
            "lchown a": outcome(os.chown, m / "a", 4, 4, follow_symlinks=False),
            "lutime a": outcome(os.utime, m / "a", ns=(1, 1), follow_symlinks=False),
            "trusted xattr a": outcome(os.setxattr, m / "a", "trusted.t", b"1",
                                       follow_symlinks=False),
            "user xattr a": outcome(os.setxattr, m / "a", "user.t", b"1",
                                    follow_symlinks=False),
            "rename a": outcome(os.rename, m / "a", m / "a2"),
            "ls after rename": listing(m),
            "a2 still the link": os.readlink(m / "a2") == str(w.outside),
            "lstat a": outcome(os.lstat, m / "a"),
            "unlink r": outcome(os.unlink, m / "r"),
            "mkdir r": outcome(os.mkdir, m / "r"),
            "ls r": listing(m / "r"),
            "create in new r": outcome(write, m / "r/new"),
            "unlink a2": outcome(os.unlink, m / "a2"),
            "ls end": listing(m),
        }
        no_secret_visible(m)
    assert res == {
        "ls": ["a", "r"], "type_a": True, "readlink_a": True,
        "read r/f": "ENOENT", "read r/secret": "ENOENT", "create r/new": "ENOENT",
        "mkdir r/nd": "ENOENT", "unlink r/f": "ENOENT", "chmod r": "ENOENT",
        "setxattr r": "ENOENT", "lchown a": "ok", "lutime a": "ok", "trusted xattr a": "ok",
        "user xattr a": "EPERM", "rename a": "ok", "ls after rename": ["a2", "r"],
        "a2 still the link": True, "lstat a": "ENOENT", "unlink r": "ok", "mkdir r": "ok",
        "ls r": [], "create in new r": "ok", "unlink a2": "ok", "ls end": ["r"],
    }
    w.check_outside()


def test_lower_symlinks_below_dirs(system: str, tmp_path: Path) -> None:
    """Dirs above a lower symlink to outside (a symlink in the middle of a lower's path): the
    merge stops at the symlink, and nothing below or behind it is read or written."""
    w = World(tmp_path, 3)
    l0, l1, l2 = w.layers.lowers
    up = w.layers.upper
    (l2 / "p/q").mkdir(parents=True)
    (l2 / "p/q/f").write_bytes(b"below the symlink layer\n")
    (l2 / "e").mkdir()
    (l2 / "e/in").write_bytes(b"e below\n")
    os.symlink(w.outside, l1 / "p")
    os.symlink(w.outside, l1 / "d")
    os.symlink(w.rel(l1), l1 / "e")
    for n in ("p", "d"):
        (l0 / n).mkdir()
        (l0 / n / "own").write_bytes(f"{n}/own\n".encode())
    (up / "e").mkdir()
    (up / "e/up").write_bytes(b"e up\n")
    # and one more level: a lower dir whose child is a link to outside, renamed around
    (l0 / "h").mkdir()
    os.symlink(w.outside, l0 / "h/link")
    with mounted(system, w.layers) as m:
        res = {
            "ls": listing(m), "ls p": listing(m / "p"), "ls d": listing(m / "d"),
            "ls e": listing(m / "e"),
            "stat p/secret": outcome(os.lstat, m / "p/secret"),
            "stat p/q": outcome(os.lstat, m / "p/q"),
            "read d/secret": outcome(read, m / "d/secret"),
            "read d/f": outcome(read, m / "d/f"),
            "create d/new": outcome(write, m / "d/new"),
            "create d/f": outcome(write, m / "d/f"),
            "mkdir d/sub": outcome(os.mkdir, m / "d/sub"),
            "ls d/sub": listing(m / "d/sub"),
            "write d/own": outcome(write, m / "d/own"),
            "unlink d/own": outcome(os.unlink, m / "d/own"),
            "rename d/new": outcome(os.rename, m / "d/new", m / "d/new2"),
            "chmod d": outcome(os.chmod, m / "d", 0o700),
            "setxattr d": outcome(os.setxattr, m / "d", "user.x", b"1"),
            "rmdir d/sub": outcome(os.rmdir, m / "d/sub"),
            "mkdir e/sub": outcome(os.mkdir, m / "e/sub"),
            "rmdir e/sub": outcome(os.rmdir, m / "e/sub"),
            "stat e/in": outcome(os.lstat, m / "e/in"),
            "rename p": outcome(os.rename, m / "p", m / "p2"),
            "ls p2": listing(m / "p2"),
            "write p2/own": outcome(write, m / "p2/own", b"changed\n"),
            "rename h": outcome(os.rename, m / "h", m / "h2"),
            "h2/link": os.readlink(m / "h2/link") == str(w.outside),
            "chown h2/link": outcome(os.chown, m / "h2/link", 3, 3, follow_symlinks=False),
            "unlink d/new2": outcome(os.unlink, m / "d/new2"),
            "unlink d/f": outcome(os.unlink, m / "d/f"),
            "rmdir d": outcome(os.rmdir, m / "d"),
            "rmdir e": outcome(os.rmdir, m / "e"),
            "ls end": listing(m),
        }
        no_secret_visible(m)
    assert res == {
        "ls": ["d", "e", "h", "p"], "ls p": ["own"], "ls d": ["own"], "ls e": ["up"],
        "stat p/secret": "ENOENT", "stat p/q": "ENOENT", "read d/secret": "ENOENT",
        "read d/f": "ENOENT", "create d/new": "ok", "create d/f": "ok", "mkdir d/sub": "ok",
        "ls d/sub": [], "write d/own": "ok", "unlink d/own": "ok", "rename d/new": "ok",
        "chmod d": "ok", "setxattr d": "ok", "rmdir d/sub": "ok", "mkdir e/sub": "ok",
        "rmdir e/sub": "ok", "stat e/in": "ENOENT", "rename p": "ok", "ls p2": ["own"],
        "write p2/own": "ok", "rename h": "ok", "h2/link": True, "chown h2/link": "ok",
        "unlink d/new2": "ok", "unlink d/f": "ok", "rmdir d": "ok", "rmdir e": "ENOTEMPTY",
        "ls end": ["e", "h2", "p2"],
    }
    w.check_outside()


@pytest.mark.parametrize("workdir_trap", ["work-subdir-is-link", "temp-names-are-links"])
def test_workdir_entries_are_not_followed(system: str, tmp_path: Path, workdir_trap: str) -> None:
    """Symlinks to outside left in the work dir, where the overlay puts its temp files (the
    kernel's ``work/#N``, overlayfuse's ``work/#ovfN``): every change that goes through the
    work dir (copy-up, whiteout, opaque dir, create over a whiteout, link) stays inside."""
    w = World(tmp_path, 1)
    low, work = w.layers.lowers[0], w.layers.work
    for n in ("a", "b", "c", "h"):
        (low / n).write_bytes(f"lower {n}\n".encode() * 1000)
    (low / "d").mkdir()
    (low / "d/x").write_bytes(b"x")
    (low / "r").mkdir()
    (low / "r/y").write_bytes(b"y")
    if workdir_trap == "work-subdir-is-link":
        os.symlink(w.outside, work / "work")
    else:
        (work / "work").mkdir()
        for i in range(64):
            os.symlink(w.outside / "f", work / "work" / f"#{i:x}")
            os.symlink(w.outside / "f", work / "work" / f"#ovf{i:x}")
    with mounted(system, w.layers) as m:
        with open(m / "a", "ab") as f:
            f.write(b"appended\n")
        os.chmod(m / "b", 0o600)
        os.truncate(m / "c", 5)
        os.unlink(m / "d/x")
        os.rmdir(m / "d")
        os.mkdir(m / "d")
        os.rename(m / "r", m / "r2")
        (m / "new").write_bytes(b"new")
        os.unlink(m / "new")
        (m / "new").write_bytes(b"new again")
        os.link(m / "h", m / "h2")
        os.mkfifo(m / "fifo")
        os.symlink("a", m / "sym")
        res = {"ls": listing(m), "a": (m / "a").read_bytes()[-9:], "c": (m / "c").read_bytes(),
               "d": listing(m / "d"), "r2": listing(m / "r2"),
               "h": os.lstat(m / "h").st_ino == os.lstat(m / "h2").st_ino}
        no_secret_visible(m)
    assert res == {"ls": ["a", "b", "c", "d", "fifo", "h", "h2", "new", "r2", "sym"],
                   "a": b"appended\n", "c": b"lower", "d": [], "r2": ["y"], "h": True}
    w.check_outside()


# ------------------------------------------------------------------------------- xattrs


def test_private_xattrs_hidden(system: str, layers: Layers) -> None:
    """The overlay's markers (opaque, redirect, origin, index...) never show through the
    mount, and reading them by name gives what the kernel gives: ENODATA."""
    low = layers.lowers[1]
    (low / "d").mkdir()
    (low / "d/x").write_bytes(b"x")
    (low / "r").mkdir()
    (low / "r/y").write_bytes(b"y")
    (low / "f").write_bytes(b"f")
    (low / "g").write_bytes(b"g")
    (layers.lowers[0] / "o").mkdir()
    os.setxattr(layers.lowers[0] / "o", "trusted.overlay.opaque", b"y")
    with mounted(system, layers) as m:
        os.chmod(m / "f", 0o600)  # copy-up: origin
        os.rename(m / "r", m / "r2")  # redirect
        os.unlink(m / "d/x")
        os.rmdir(m / "d")
        os.mkdir(m / "d")  # opaque
        os.link(m / "g", m / "g2")
        for p in ("f", "r2", "d", "o", "g", "."):
            names = os.listxattr(m / p)
            assert not [n for n in names if n.startswith("trusted.overlay.")], (p, names)
        res = {
            "opaque d": outcome(os.getxattr, m / "d", "trusted.overlay.opaque"),
            "opaque o": outcome(os.getxattr, m / "o", "trusted.overlay.opaque"),
            "redirect": outcome(os.getxattr, m / "r2", "trusted.overlay.redirect"),
            "origin": outcome(os.getxattr, m / "f", "trusted.overlay.origin"),
            "remove redirect": outcome(os.removexattr, m / "r2", "trusted.overlay.redirect"),
            "remove opaque": outcome(os.removexattr, m / "d", "trusted.overlay.opaque"),
        }
        # the markers still work after those attempts
        assert sorted(os.listdir(m / "r2")) == ["y"] and os.listdir(m / "d") == []
    assert res == {"opaque d": "ENODATA", "opaque o": "ENODATA", "redirect": "ENODATA",
                   "origin": "ENODATA", "remove redirect": "ENODATA",
                   "remove opaque": "ENODATA"}
    assert os.getxattr(layers.upper / "d", "trusted.overlay.opaque") == b"y"


def test_private_xattrs_cannot_be_forged(system: str, layers: Layers) -> None:
    """Setting ``trusted.overlay.opaque``/``redirect`` through the mount never makes a dir
    opaque or redirected, now or after a remount.

    Kernel >= 6.7 accepts the call and stores the value escaped
    (``trusted.overlay.overlay.NAME``), showing it back under the caller's name; overlayfuse
    does the same. ``user.overlay.*`` is an ordinary name on a root (trusted) mount."""
    low = layers.lowers[1]
    for n in ("m", "n"):
        (low / n).mkdir()
        (low / n / "below").write_bytes(b"b")
    (low / "f").write_bytes(b"f")
    with mounted(system, layers) as m:
        res = {
            "set opaque": outcome(os.setxattr, m / "m", "trusted.overlay.opaque", b"y"),
            "get opaque": outcome(os.getxattr, m / "m", "trusted.overlay.opaque"),
            "set redirect": outcome(os.setxattr, m / "n", "trusted.overlay.redirect", b"/m"),
            "set whiteout": outcome(os.setxattr, m / "f", "trusted.overlay.whiteout", b"y"),
            "set user.overlay": outcome(os.setxattr, m / "f", "user.overlay.opaque", b"y"),
            "get user.overlay": outcome(os.getxattr, m / "f", "user.overlay.opaque"),
            "ls": listing(m), "ls m": listing(m / "m"), "ls n": listing(m / "n"),
        }
    assert res == {"set opaque": "ok", "get opaque": b"y", "set redirect": "ok",
                   "set whiteout": "ok", "set user.overlay": "ok", "get user.overlay": b"y",
                   "ls": ["f", "m", "n"], "ls m": ["below"], "ls n": ["below"]}
    # stored escaped, so that no overlay reads them as its own markers
    assert os.getxattr(layers.upper / "m", "trusted.overlay.overlay.opaque") == b"y"
    with pytest.raises(OSError) as ei:
        os.getxattr(layers.upper / "m", "trusted.overlay.opaque")
    assert ei.value.errno == errno.ENODATA
    with mounted(system, layers) as m:
        assert listing(m / "m") == ["below"] and listing(m / "n") == ["below"]
        assert (m / "f").read_bytes() == b"f"
