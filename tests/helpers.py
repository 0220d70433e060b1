"""Small helpers several test modules share: the CLI as a subprocess, comparable outcomes."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def ovf(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m overlayfuse ARGS`` from this checkout; ``env`` adds to the environment."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "overlayfuse", *args], capture_output=True,
                          text=True, env=env, timeout=120, **kw)


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``"ok"`` (or the call's value when not None) or the errno's name: comparable results."""
    try:
        r = fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok" if r is None else r


_libc = ctypes.CDLL(None, use_errno=True)


def aio_pwrite(fd: int, buf: mmap.mmap, off: int) -> int:
    """One asynchronous write through io_submit (x86_64 syscall numbers), waited for."""
    ctx = ctypes.c_ulong(0)
    if _libc.syscall(206, 1, ctypes.byref(ctx)) != 0:  # io_setup
        raise OSError(ctypes.get_errno(), "io_setup")
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        iocb = ctypes.create_string_buffer(struct.pack(
            "<QIIHhIQQqQII", 0, 0, 0, 1, 0, fd, addr, len(buf), off, 0, 0, 0), 64)  # PWRITE
        iocbs = (ctypes.c_void_p * 1)(ctypes.addressof(iocb))
        if _libc.syscall(209, ctx, 1, iocbs) != 1:  # io_submit
            raise OSError(ctypes.get_errno(), "io_submit")
        event = ctypes.create_string_buffer(32)
        if _libc.syscall(208, ctx, 1, 1, event, None) != 1:  # io_getevents
            raise OSError(ctypes.get_errno(), "io_getevents")
        return struct.unpack("<QQqq", event.raw)[2]
    finally:
        _libc.syscall(207, ctx)  # io_destroy


def busybox_tree(path: Path, applets: tuple[str, ...], *,
                 dirs: tuple[str, ...] = ("bin", "etc", "root", "tmp"),
                 shell: str | None = "/bin/sh") -> Path:
    """A tiny root for commands that see it as ``/``: busybox-static and symlinks for
    ``applets`` in bin/, ``dirs`` (tmp/ sticky and world-writable), and root's passwd entry
    with ``shell`` (none when None)."""
    for d in dirs:
        (path / d).mkdir(parents=True)
    os.chmod(path / "tmp", 0o1777)
    shutil.copy2("/bin/busybox", path / "bin/busybox")
    for applet in applets:
        os.symlink("busybox", path / "bin" / applet)
    if shell is not None:
        (path / "etc/passwd").write_text(f"root:x:0:0:root:/root:{shell}\n")
    return path
