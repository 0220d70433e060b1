"""Run as some user inside a merged tree (its cwd): try operations, print what each gave.

Standalone (stdlib only): ``python3 perm_ops.py OPS_JSON`` prints a JSON list with one result
per operation: "ok" (with what the operation made: mode and owner of a new entry, the mode
after a write) or the errno name.  Each operation is the kind of thing a permission check
stands in front of: read, write, create, unlink in a sticky dir, chmod/chown, O_NOATIME,
user.* xattrs, utime.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import sys


def _mode_owner(path: str) -> list:
    st = os.lstat(path)
    return [oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid]


def _close_after(fd: int, fn) -> object:
    try:
        return fn(fd)
    finally:
        os.close(fd)


def run(op: list) -> object:
    kind, path, *args = op
    if kind == "read":
        return _close_after(os.open(path, os.O_RDONLY), lambda fd: len(os.read(fd, 100)))
    if kind == "listdir":
        return len(os.listdir(path))
    if kind == "append":
        _close_after(os.open(path, os.O_WRONLY | os.O_APPEND), lambda fd: os.write(fd, b"x"))
        return _mode_owner(path)
    if kind == "create":
        old = os.umask(args[1] if len(args) > 1 else 0o022)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, args[0]))
        finally:
            os.umask(old)
        return _mode_owner(path)
    if kind == "mkdir":
        os.mkdir(path, args[0])
        return _mode_owner(path)
    if kind == "unlink":
        os.unlink(path)
    elif kind == "rmdir":
        os.rmdir(path)
    elif kind == "rename":
        os.rename(path, args[0])
    elif kind == "link":
        os.link(path, args[0])
    elif kind == "chmod":
        os.chmod(path, args[0])
        return _mode_owner(path)
    elif kind == "chown":
        os.chown(path, args[0], args[1], follow_symlinks=False)
        return _mode_owner(path)
    elif kind == "truncate":
        os.truncate(path, 0)
    elif kind == "noatime":
        os.close(os.open(path, os.O_RDONLY | os.O_NOATIME))
    elif kind == "setxattr":
        os.setxattr(path, args[0], b"v", follow_symlinks=False)
    elif kind == "getxattr":
        return os.getxattr(path, args[0], follow_symlinks=False).decode()
    elif kind == "utime-now":
        os.utime(path, None)
    elif kind == "utime-set":
        os.utime(path, (1_000_000, 1_000_000))
    else:
        raise ValueError(f"unknown operation {kind}")
    return "ok"


def main() -> None:
    with open(sys.argv[1]) as f:
        ops = json.load(f)
    results = []
    for op in ops:
        try:
            results.append(run(op))
        except OSError as e:
            results.append(errno.errorcode.get(e.errno or 0, str(e.errno)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
