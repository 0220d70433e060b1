"""Hostile layers: content made to attack the daemon gets the kernel's answers, and no crash.

Redirects that point out of the layer (``../../etc``, ``/../../etc``) or at the directory
itself, an origin xattr of garbage, names with a newline or invalid UTF-8, and a path of more
than 4095 bytes below the mount point.  Every entry of the merged tree is listed, stat'ed and
read through directory descriptors (the long path is never spelled out) on a kernel overlay
and on overlayfuse over the same layers: the outcomes must agree, nothing outside the layers
may show, and the daemon must still serve afterwards.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mounts import kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs and kernel "
                                "overlays need root")

SECRET = b"outside the layers\n"
LONG = "L" * 250


def build(root: Path) -> tuple[list[Path], Path]:
    """Lowers and upper under ``root``; a file beside them that must never show."""
    layers = make_layers(root)
    (root / "etc").mkdir()
    (root / "etc" / "secret").write_bytes(SECRET)
    low, upper = layers.lowers[1], layers.upper
    (low / "victim").mkdir()
    (low / "victim" / "inside").write_bytes(b"lower victim\n")
    for name, redirect in (("out_rel", b"../../etc"), ("out_abs", b"/../../etc"),
                           ("self_abs", b"/self_abs"), ("self_rel", b"self_rel"),
                           ("dotdot", b".."), ("deep", b"/victim/../../etc")):
        (upper / name).mkdir()
        os.setxattr(upper / name, "trusted.overlay.redirect", redirect)
    (low / "self_abs").mkdir()
    (low / "self_abs" / "kept").write_bytes(b"self redirect\n")
    (upper / "garbage").write_bytes(b"upper file\n")
    os.setxattr(upper / "garbage", "trusted.overlay.origin", b"\x00\xfbgarbage" * 7)
    (upper / "garbage_dir").mkdir()
    os.setxattr(upper / "garbage_dir", "trusted.overlay.origin", b"\xff" * 3)
    for name in (b"new\nline", b"bad\xff\xfeutf8", b"tab\tand space"):
        with open(os.fsencode(low) + b"/" + name, "wb") as f:
            f.write(name)
    fd = os.open(low, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(17):  # 17 * 251 bytes: a path longer than PATH_MAX below the root
        os.mkdir(LONG, dir_fd=fd)
        nxt = os.open(LONG, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep down\n")
    os.close(fd)
    return layers.lowers, upper


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def walk(mnt: Path) -> dict[bytes, Any]:
    """Every entry's (type, size, content digest) or errno, reached by dir fds only."""
    out: dict[bytes, Any] = {}

    def visit(dirfd: int, rel: bytes) -> None:
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(dirfd))
        except OSError as e:
            out[rel + b"/"] = _err(e)
            return
        for name in names:
            path = rel + b"/" + name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError as e:
                out[path] = _err(e)
                continue
            if stat.S_ISDIR(st.st_mode):
                out[path] = "d"
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                  dir_fd=dirfd)
                except OSError as e:
                    out[path] = ("d", _err(e))
                    continue
                try:
                    visit(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                    with open(fd, "rb") as f:
                        data = f.read()
                    out[path] = ("f", st.st_size, hashlib.sha256(data).hexdigest()[:16])
                    assert data != SECRET, f"{path!r} shows a file from outside the layers"
                except OSError as e:
                    out[path] = ("f", _err(e))
            else:
                out[path] = stat.S_IFMT(st.st_mode)

    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        visit(root, b"")
    finally:
        os.close(root)
    return out


def test_hostile_layers_answer_like_the_kernel(tmp_path: Path) -> None:
    k_lowers, k_upper = build(tmp_path / "k")
    f_lowers, f_upper = build(tmp_path / "f")
    k, f = tmp_path / "k", tmp_path / "f"
    with kernel_overlay(k_lowers, k_upper, k / "work", k / "mnt"):
        kernel = walk(k / "mnt")
    with overlayfuse_mount(f_lowers, f_upper, f / "work", f / "mnt") as dm:
        ours = walk(f / "mnt")
        assert dm.alive(), "the daemon died"
        assert sorted(os.listdir(f / "mnt"))  # and still serves
    assert b"/" + b"/".join([LONG.encode()] * 17) + b"/bottom" in kernel
    diffs = [f"{p!r}: kernel {kernel.get(p)!r} overlayfuse {ours.get(p)!r}"
             for p in sorted(set(kernel) | set(ours)) if kernel.get(p) != ours.get(p)]
    assert not diffs, "\n".join(diffs)
