"""Shared fixtures: layer dirs, the unprivileged runner, and guards against leaked mounts."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import Layers, force_unmount, make_layers, mounts_under
from unpriv import (SESSION_HOMES, Unprivileged, build_pythonpath, ensure_user,
                    fuse_device_mode, fuse_mode_holders, make_home, no_subordinate_ids,
                    system_python)


def _watched_roots(factory: pytest.TempPathFactory) -> list[str]:
    """This session's dirs only: other sessions may be mounting in theirs right now."""
    return [str(factory.getbasetemp()), *(str(h) for h in SESSION_HOMES if h.exists())]


def _mounts_in(roots: list[str]) -> set[str]:
    return {m.mountpoint for r in roots for m in mounts_under(r)}


@pytest.fixture(autouse=True)
def _no_leaked_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the test that leaves a mount behind in the test dirs (and take the mount down)."""
    before = _mounts_in(_watched_roots(tmp_path_factory))
    yield
    leaked = _mounts_in(_watched_roots(tmp_path_factory)) - before
    if leaked:
        for mnt in sorted(leaked, key=len, reverse=True):
            force_unmount(mnt)
        pytest.fail(f"test leaked mounts (now unmounted): {sorted(leaked)}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _session_mount_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session nothing may stay mounted in the test dirs, and this session
    must no longer hold /dev/fuse open to everyone."""
    yield
    problems = []
    leaked = _mounts_in(_watched_roots(tmp_path_factory))
    if leaked:
        for mnt in sorted(leaked, key=len, reverse=True):
            force_unmount(mnt)
        problems.append(f"mounts left behind by the session (now unmounted): {sorted(leaked)}")
    if os.geteuid() == 0 and os.path.exists("/dev/fuse") and os.getpid() in fuse_mode_holders():
        problems.append("/dev/fuse is still opened up (mode 0666) by this session")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A fresh dir under /tmp that every user may traverse (pytest's tmp dirs are root's
    only): for processes running as other IDs (mapped users, containers).  Watched for leaked
    mounts like the unprivileged homes; removed afterwards."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ovf-open-", dir="/tmp"))
    os.chmod(d, 0o755)
    SESSION_HOMES.append(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    """Empty lower0, lower1, upper, work and mnt dirs in the test's tmp dir."""
    return make_layers(tmp_path)


@pytest.fixture(scope="session")
def unpriv_pythonpath() -> Iterator[Path]:
    """A world-readable copy of pyfuse3, trio (+deps) and overlayfuse, built once per session."""
    if os.geteuid() != 0:
        pytest.skip("the unprivileged runner needs a root test session")
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="ovf-unpriv-py-", dir="/tmp"))
    try:
        yield build_pythonpath(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def unprivileged(unpriv_pythonpath: Path) -> Iterator[Unprivileged]:
    """Runs commands (and overlayfuse) as the system user ``ovfuser``; /dev/fuse is 0666 while
    the test runs and gets its old mode back afterwards."""
    uid, gid = ensure_user()
    home = make_home(uid, gid)
    u = Unprivileged("ovfuser", uid, gid, system_python(), unpriv_pythonpath, home)
    try:
        with fuse_device_mode(0o666):
            yield u
    finally:
        leaked = sorted({m.mountpoint for m in mounts_under(home)}, key=len, reverse=True)
        for m in leaked:
            force_unmount(m, u)
        if not mounts_under(home):
            shutil.rmtree(home, ignore_errors=True)
    if leaked:
        pytest.fail(f"test leaked mounts as {u.user} (now unmounted): {leaked}", pytrace=False)


@pytest.fixture
def private_probe_cache(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> Path:
    """An own probe cache for the test: no verdict leaks between tests or into ~/.cache."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    return d


@pytest.fixture
def no_subids(unprivileged: Unprivileged) -> Iterator[None]:
    """The test user has no subordinate ranges while the test runs (checked, and held so:
    other test sessions wait with theirs)."""
    with no_subordinate_ids(unprivileged.user, unprivileged.uid):
        yield
