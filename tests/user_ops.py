"""Run as the unprivileged user inside a merged tree (its cwd): apply operations, print the tree.

Standalone (stdlib only), because the user's interpreter has no test dependencies:
``python3 user_ops.py OPS_JSON`` applies each operation of the JSON list to the current dir
and prints one JSON object: each operation's outcome ("ok" or the errno name) and the tree as
a process sees it (type, mode, size, data digest, link target, link count of files, and which
names share an inode).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys


def apply(op: list) -> str:
    kind, *args = op
    try:
        if kind == "append":
            fd = os.open(args[0], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                os.write(fd, args[1].encode())
            finally:
                os.close(fd)
        elif kind == "create":
            fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, args[1].encode())
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(args[0], 0)
        elif kind == "mkdir":
            os.mkdir(args[0])
        elif kind == "unlink":
            os.unlink(args[0])
        elif kind == "rmdir":
            os.rmdir(args[0])
        elif kind == "rename":
            os.rename(args[0], args[1])
        elif kind == "link":
            os.link(args[0], args[1], follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(args[0], args[1])
        elif kind == "chmod":
            os.chmod(args[0], args[1], follow_symlinks=True)
        else:
            raise ValueError(f"unknown operation {kind}")
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def tree() -> dict[str, list]:
    """Every entry below the cwd, without following symlinks."""
    out: dict[str, list] = {}
    groups: dict[int, int] = {}
    for top, dirs, files in os.walk(".", followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(top, name)[2:]
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            entry: list = [kind, stat.S_IMODE(st.st_mode)]
            if stat.S_ISREG(kind):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
                group = groups.setdefault(st.st_ino, len(groups))
                entry += [st.st_size, digest, st.st_nlink, group]
            elif stat.S_ISLNK(kind):
                entry.append(os.readlink(path))
            out[path] = entry
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        ops = json.load(f)
    outcomes = [apply(op) for op in ops]
    json.dump({"outcomes": outcomes, "tree": tree()}, sys.stdout)


if __name__ == "__main__":
    main()
