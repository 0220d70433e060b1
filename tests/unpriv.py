"""Run commands, and overlayfuse itself, as an unprivileged user from a root test session.

The test session is root and its venv may sit under /root (mode 700), out of another user's
reach. So the unprivileged side gets its own interpreter environment: Debian's python3 with a
world-readable PYTHONPATH holding copies of pyfuse3, trio (and their dependencies) and the
overlayfuse package. /dev/fuse is mode 600 on this machine; :func:`fuse_device_mode` opens it
for the duration of a test and always puts the old mode back.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mounts import (DaemonMount, Layers, REPO, fuse_overlayfs_mount, make_layers,
                    overlayfuse_mount)

log = logging.getLogger(__name__)

USER = "ovfuser"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNTIME_DISTS = ("pyfuse3", "trio")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def ensure_user(name: str = USER) -> tuple[int, int]:
    """Return (uid, gid) of system user *name*, creating it (no home, no login) if missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                           capture_output=True, text=True)
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise RuntimeError(f"useradd {name}: {r.stderr.strip()}")
        pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


STATE_DIR = Path("/run/overlayfuse-tests")
# homes made by this process: the leak guards watch these, not other sessions' dirs
SESSION_HOMES: list[Path] = []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _device_state(dev: str) -> Iterator[dict[str, Any]]:
    """The shared record of who opened *dev*, under an flock (several test sessions may run at
    once: the first one in saves the original mode, the last one out restores it)."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    name = dev.strip("/").replace("/", "_")
    lock, state = STATE_DIR / f"{name}.lock", STATE_DIR / f"{name}.json"
    with open(lock, "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        data = json.loads(state.read_text()) if state.exists() else {"holders": []}
        data["holders"] = [p for p in data["holders"] if _alive(p)]
        yield data
        if data["holders"]:
            state.write_text(json.dumps(data))
        elif state.exists():
            state.unlink()


def fuse_mode_holders(dev: str = "/dev/fuse") -> list[int]:
    """PIDs of live processes that currently keep *dev* opened up."""
    with _device_state(dev) as data:
        return list(data["holders"])


@contextlib.contextmanager
def fuse_device_mode(mode: int = 0o666, dev: str = "/dev/fuse") -> Iterator[None]:
    """Set *dev*'s permission bits to *mode* for the block; the original bits come back when
    the last holder (across concurrent test sessions) leaves, even on error."""
    with _device_state(dev) as data:
        if not data["holders"]:
            data["original"] = stat.S_IMODE(os.stat(dev).st_mode)
        data["holders"].append(os.getpid())
        os.chmod(dev, mode)
    try:
        yield
    finally:
        with _device_state(dev) as data:
            if os.getpid() in data["holders"]:
                data["holders"].remove(os.getpid())
            if not data["holders"] and "original" in data:
                os.chmod(dev, data["original"])


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of *dist*'s unconditional (non-extra) requirements."""
    names = []
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if m:
            names.append(m.group(1))
    return names


def runtime_distributions(roots: Sequence[str] = RUNTIME_DISTS) -> list[metadata.Distribution]:
    """*roots* and everything they need at runtime, as installed in this interpreter."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in roots:
                raise
            continue  # a dependency for another Python version (exceptiongroup on 3.11...)
        seen[key] = dist
        todo += _requirement_names(dist)
    return list(seen.values())


def build_pythonpath(dest: Path) -> Path:
    """Copy the runtime dependencies and the overlayfuse package into *dest*, world-readable."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in runtime_distributions():
        base = Path(dist.locate_file(""))
        for rel in dist.files or []:
            if rel.parts and rel.parts[0] == "..":
                continue  # console scripts outside site-packages
            src = base / rel
            if not src.is_file() or "__pycache__" in rel.parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    shutil.copytree(REPO / "overlayfuse", dest / "overlayfuse", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for d, dirs, files in os.walk(dest):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644 | (os.stat(os.path.join(d, f)).st_mode & 0o111))
    os.chmod(dest, 0o755)
    return dest


def system_python() -> str:
    """Debian's interpreter, checked to match this one (pyfuse3 is a compiled extension)."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                       capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != want:
        raise RuntimeError(f"{SYSTEM_PYTHON} is Python {r.stdout.strip() or '?'}, "
                           f"the test venv is {want}: the copied pyfuse3 would not load")
    return SYSTEM_PYTHON


@dataclass
class Unprivileged:
    """An unprivileged user, a reachable python environment and a scratch dir it owns.

    ``home`` is a fresh directory under /tmp (reachable by the user, owned by it) removed after
    the test; ``python`` with ``env()`` imports pyfuse3, trio and overlayfuse.
    """

    user: str
    uid: int
    gid: int
    python: str
    pythonpath: Path
    home: Path

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Prefix *argv* so that it runs as the user (real and effective ids, no groups)."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--",
                *map(os.fspath, argv)]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for the user: its home, a safe PATH, the copied PYTHONPATH."""
        env = {"PATH": SAFE_PATH, "HOME": str(self.home), "USER": self.user,
               "LOGNAME": self.user, "LANG": "C.UTF-8", "PYTHONPATH": str(self.pythonpath),
               "PYTHONDONTWRITEBYTECODE": "1"}
        env.update(extra or {})
        return env

    def _kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        kw["env"] = self.env(kw.pop("env", None))
        kw.setdefault("cwd", str(self.home))
        if kw["cwd"] is None:
            kw["cwd"] = str(self.home)
        return kw

    def run_as_user(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` as the user; ``env=`` adds to (not replaces) the user's env."""
        return subprocess.run(self.argv(argv), **self._kw(kw))

    def popen_as_user(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` as the user (setpriv execs, so ``.pid`` is the command's)."""
        return subprocess.Popen(self.argv(argv), **self._kw(kw))

    run = run_as_user
    popen = popen_as_user

    def python_run(self, code: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run Python *code* as the user with the copied environment."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return self.run_as_user([self.python, "-c", code], **kw)

    def chown(self, *paths: os.PathLike[str] | str) -> None:
        """Give *paths* (not recursively) to the user."""
        for p in paths:
            os.chown(p, self.uid, self.gid)

    def make_layers(self, n_lowers: int = 2, name: str = "layers") -> Layers:
        """:func:`mounts.make_layers` under ``home``, every directory owned by the user."""
        layers = make_layers(self.home / name, n_lowers)
        self.chown(layers.root, *layers.lowers, layers.upper, layers.work, layers.mnt)
        return layers

    def overlayfuse_mount(self, lowers: Sequence[os.PathLike[str] | str],
                          upper: os.PathLike[str] | str | None,
                          work: os.PathLike[str] | str | None, mnt: os.PathLike[str] | str,
                          extra: Sequence[str] = ()
                          ) -> contextlib.AbstractContextManager[DaemonMount]:
        """overlayfuse mounted by the user (through fusermount3)."""
        return overlayfuse_mount(lowers, upper, work, mnt, extra, user=self)

    def fuse_overlayfs_mount(self, lowers: Sequence[os.PathLike[str] | str],
                             upper: os.PathLike[str] | str | None,
                             work: os.PathLike[str] | str | None, mnt: os.PathLike[str] | str,
                             extra: Sequence[str] = ()
                             ) -> contextlib.AbstractContextManager[DaemonMount]:
        """fuse-overlayfs mounted by the user (for comparison)."""
        return fuse_overlayfs_mount(lowers, upper, work, mnt, extra, user=self)


def make_home(uid: int, gid: int) -> Path:
    """A fresh directory under /tmp owned by the user (its parents are world-traversable)."""
    home = Path(tempfile.mkdtemp(prefix="ovf-unpriv-home-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.chown(home, uid, gid)
    SESSION_HOMES.append(home)
    return home


_subids_held = 0  # subids_lock's depth in this process: one test may nest the two


@contextlib.contextmanager
def subids_lock() -> Iterator[None]:
    """The flock over /etc/subuid and /etc/subgid that every test session takes while it
    relies on a user's ranges, or on there being none."""
    global _subids_held
    if _subids_held:
        _subids_held += 1
        try:
            yield
        finally:
            _subids_held -= 1
        return
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(STATE_DIR / "subids.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _subids_held = 1
        try:
            yield
        finally:
            _subids_held = 0


@contextlib.contextmanager
def no_subordinate_ids(user: str, uid: int) -> Iterator[None]:
    """The block relies on ``user`` having no subordinate ranges (the one-ID fallback)."""
    from overlayfuse.sandbox.idmaps import SUBGID, SUBUID, subordinate_ranges
    with subids_lock():
        for path in (SUBUID, SUBGID):
            assert subordinate_ranges(path, user, uid) == [], f"precondition: no ranges in {path}"
        yield


@contextlib.contextmanager
def subordinate_ids(user: str, start: int, count: int) -> Iterator[None]:
    """``user:start:count`` in /etc/subuid and /etc/subgid for the block; afterwards the files
    are put back byte for byte (or, if someone else changed them meanwhile, only our line is
    taken out again), even when the test fails.  The block holds an flock shared by all test
    sessions: a user's ranges are chained in file order, so another session's line for the
    same user would shift every ID this one expects."""
    line = f"{user}:{start}:{count}\n".encode()
    saved: dict[str, bytes | None] = {}
    written: dict[str, bytes] = {}
    with subids_lock():
        try:
            for f in ("/etc/subuid", "/etc/subgid"):
                old = Path(f).read_bytes() if os.path.exists(f) else None
                saved[f] = old
                text = old or b""
                written[f] = text + (b"\n" if text and not text.endswith(b"\n") else b"") + line
                Path(f).write_bytes(written[f])
            yield
        finally:
            for f, old in saved.items():
                now = Path(f).read_bytes() if os.path.exists(f) else b""
                if now == written.get(f):
                    if old is None:
                        os.unlink(f)
                    else:
                        Path(f).write_bytes(old)
                else:
                    Path(f).write_bytes(now.replace(line, b""))
