"""Bad input: one line ``overlayfuse: ...`` on stderr, a non-zero exit, and nothing changed on disk.

Each case runs the real command line in a subprocess through every entry point that mounts
(``mount --backend fuse``, ``mount --backend kernel`` and the fuse-overlayfs form) and compares
a snapshot of the test's directory (names, types, modes, mtimes) before and after.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mounts import (REPO, Layers, esc, force_unmount, is_mounted, kernel_overlay, make_layers,
                    overlayfuse_mount)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")

Form = Callable[[str, str], list[str]]
FORMS: dict[str, Form] = {
    "mount-fuse": lambda opts, mnt: ["mount", "--backend", "fuse", "-o", opts, mnt],
    "mount-kernel": lambda opts, mnt: ["mount", "--backend", "kernel", "-o", opts, mnt],
    "fuse-overlayfs": lambda opts, mnt: ["-o", opts, mnt],
}
FUSE_FORMS = ("mount-fuse", "fuse-overlayfs")


@pytest.fixture(params=sorted(FORMS))
def form(request: pytest.FixtureRequest) -> Form:
    return FORMS[request.param]


@pytest.fixture(params=FUSE_FORMS)
def fuse_form(request: pytest.FixtureRequest) -> Form:
    return FORMS[request.param]


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path below ``root`` (root included): file type, mode and mtime, no symlink followed."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(p)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            out[os.path.relpath(p, root)] = (kind, st.st_mode, st.st_mtime_ns)
    return out


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def opts_of(lowers: Sequence[Path], upper: Path | None = None, work: Path | None = None) -> str:
    items = ["lowerdir=" + ":".join(esc(p) for p in lowers)]
    if upper is not None:
        items.append(f"upperdir={esc(upper)}")
    if work is not None:
        items.append(f"workdir={esc(work)}")
    return ",".join(items)


def assert_refused(root: Path, argv: Sequence[str], mnt: Path, *fragments: str,
                   prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> str:
    """Run the CLI; it must fail with one clean line naming ``fragments`` and change nothing."""
    before = snapshot(root)
    was_mounted = is_mounted(mnt)
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", "overlayfuse", *argv],
                           capture_output=True, text=True, env=env or cli_env(), cwd=str(root),
                           stdin=subprocess.DEVNULL, timeout=60)
    finally:
        if not was_mounted and is_mounted(mnt):  # a wrongly accepted mount must not stay
            force_unmount(mnt)
            pytest.fail(f"{argv} mounted {mnt} instead of refusing")
    assert r.returncode != 0, f"{argv} succeeded: {r.stdout} {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {r.stderr!r}"
    assert lines[0].startswith("overlayfuse: "), lines[0]
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    after = snapshot(root)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    assert not changed, f"refused mount changed the disk: {changed}"
    return lines[0]


@pytest.fixture
def lay(tmp_path: Path) -> Layers:
    """Layers with a file in each lower, so that a wrongly created dir would be noticed too."""
    layers = make_layers(tmp_path / "t")
    for i, low in enumerate(layers.lowers):
        (low / f"f{i}").write_text(f"lower {i}\n")
    return layers


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for the test: a directory on another filesystem."""
    d = tmp_path / "t" / "otherfs"
    d.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ovf-test", str(d)], check=True)
    try:
        yield d
    finally:
        if not force_unmount(d):
            raise RuntimeError(f"cannot unmount {d}")


# -- layers -----------------------------------------------------------------------------------

def test_missing_lower_dir(lay: Layers, form: Form) -> None:
    missing = lay.root / "nolower"
    assert_refused(lay.root, form(opts_of([lay.lowers[0], missing], lay.upper, lay.work),
                                  str(lay.mnt)), lay.mnt, str(missing), "does not exist")


def test_lower_dir_is_a_file(lay: Layers, form: Form) -> None:
    f = lay.lowers[0] / "f0"
    assert_refused(lay.root, form(opts_of([f], lay.upper, lay.work), str(lay.mnt)), lay.mnt,
                   str(f), "not a directory")


def test_missing_upper_dir(lay: Layers, form: Form) -> None:
    missing = lay.root / "noupper"
    assert_refused(lay.root, form(opts_of(lay.lowers, missing, lay.work), str(lay.mnt)),
                   lay.mnt, str(missing), "does not exist")


def test_missing_work_dir(lay: Layers, form: Form) -> None:
    missing = lay.root / "nowork"
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, missing), str(lay.mnt)),
                   lay.mnt, str(missing), "does not exist")


def test_upper_without_work(lay: Layers, form: Form) -> None:
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper), str(lay.mnt)), lay.mnt,
                   "workdir")


def test_work_without_upper(lay: Layers, form: Form) -> None:
    assert_refused(lay.root, form(opts_of(lay.lowers, None, lay.work), str(lay.mnt)), lay.mnt,
                   "upperdir")


def test_work_dir_on_another_filesystem(lay: Layers, other_fs: Path, form: Form) -> None:
    work = other_fs / "work"
    work.mkdir()
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, work), str(lay.mnt)), lay.mnt,
                   str(work), "another filesystem")


def test_work_dir_equals_upper(lay: Layers, form: Form) -> None:
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, lay.upper), str(lay.mnt)),
                   lay.mnt, str(lay.upper))


def test_work_dir_inside_upper(lay: Layers, form: Form) -> None:
    work = lay.upper / "work"
    work.mkdir()
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, work), str(lay.mnt)), lay.mnt,
                   str(work), "inside upper dir")


def test_upper_inside_work_dir(lay: Layers, form: Form) -> None:
    upper = lay.work / "upper"
    upper.mkdir()
    assert_refused(lay.root, form(opts_of(lay.lowers, upper, lay.work), str(lay.mnt)), lay.mnt,
                   str(upper), "inside work dir")


def test_upper_inside_a_lower(lay: Layers, form: Form) -> None:
    upper = lay.lowers[1] / "upper"
    upper.mkdir()
    assert_refused(lay.root, form(opts_of(lay.lowers, upper, lay.work), str(lay.mnt)), lay.mnt,
                   str(upper), "inside lower dir")


def test_lower_inside_the_upper(lay: Layers, form: Form) -> None:
    lower = lay.upper / "lower"
    lower.mkdir()
    assert_refused(lay.root, form(opts_of([lower, *lay.lowers], lay.upper, lay.work),
                                  str(lay.mnt)), lay.mnt, str(lower), "inside upper dir")


# -- mount point ------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["lower", "upper", "work"])
def test_mount_point_inside_a_layer(lay: Layers, form: Form, layer: str) -> None:
    parent = {"lower": lay.lowers[0], "upper": lay.upper, "work": lay.work}[layer]
    mnt = parent / "mnt"
    mnt.mkdir()
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, lay.work), str(mnt)), mnt,
                   str(mnt), f"inside {layer} dir")


def test_non_empty_mount_point(lay: Layers, form: Form) -> None:
    (lay.mnt / "something").write_text("x")
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, lay.work), str(lay.mnt)),
                   lay.mnt, str(lay.mnt), "not empty")


def test_busy_mount_point(lay: Layers, form: Form) -> None:
    empty = lay.root / "empty"
    empty.mkdir()
    subprocess.run(["mount", "--bind", str(empty), str(lay.mnt)], check=True)
    try:
        assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, lay.work), str(lay.mnt)),
                       lay.mnt, str(lay.mnt), "busy")
    finally:
        assert force_unmount(lay.mnt)


def _warm_probe(opts: str) -> None:
    """The kernel backend refuses these only at mount time, after its trial mount, which a
    cold probe cache makes in the upper's parent: probe first, so that the snapshot compares
    the refused mount's own footprint."""
    subprocess.run([sys.executable, "-m", "overlayfuse", "check", "-o", opts],
                   capture_output=True, env=cli_env(), timeout=60, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def _first_mount(lay: Layers, form: Form, extra: str = "") -> Iterator[None]:
    """A live mount of the layers: a kernel overlay for the kernel form (the kernel marks its
    dirs in use, not ours), an overlayfuse daemon otherwise."""
    if form is FORMS["mount-kernel"]:
        with kernel_overlay(lay.lowers, lay.upper, lay.work, lay.mnt, "index=on" + extra):
            yield
    else:
        with overlayfuse_mount(lay.lowers, lay.upper, lay.work, lay.mnt):
            yield


def test_upper_and_work_in_use_by_another_mount(lay: Layers, form: Form) -> None:
    """As the kernel: a second mount of a live mount's upper and work dir is refused (EBUSY)
    where the index is on: always for the FUSE daemon (it keeps a hard-link index), with
    ``index=on`` for the kernel's overlay (this kernel's default is off: it only warns)."""
    mnt2 = lay.root / "mnt2"
    mnt2.mkdir()
    opts = opts_of(lay.lowers, lay.upper, lay.work)
    if form is FORMS["mount-kernel"]:
        opts += ",index=on"
        _warm_probe(opts)
    with _first_mount(lay, form):
        (lay.mnt / "f0").write_text("changed by the first mount\n")
        assert_refused(lay.root, form(opts, str(mnt2)), mnt2, "in use")
        assert (lay.mnt / "f0").read_text() == "changed by the first mount\n"


def test_kernel_mount_refuses_the_upper_of_a_live_fuse_mount(lay: Layers) -> None:
    """The kernel does not see the FUSE daemon's claim: the kernel backend checks it."""
    mnt2 = lay.root / "mnt2"
    mnt2.mkdir()
    opts = opts_of(lay.lowers, lay.upper, lay.work)
    _warm_probe(opts)
    with overlayfuse_mount(lay.lowers, lay.upper, lay.work, lay.mnt):
        assert_refused(lay.root, FORMS["mount-kernel"](opts, str(mnt2)), mnt2, "in use")


def test_fuse_mount_refuses_the_upper_of_a_live_kernel_overlay(lay: Layers,
                                                               fuse_form: Form) -> None:
    """The FUSE daemon cannot see the kernel's in-use mark: it finds the kernel overlay by
    its mount options."""
    mnt2 = lay.root / "mnt2"
    mnt2.mkdir()
    with kernel_overlay(lay.lowers, lay.upper, lay.work, lay.mnt, "index=on"):
        assert_refused(lay.root, fuse_form(opts_of(lay.lowers, lay.upper, lay.work), str(mnt2)),
                       mnt2, "in use by the kernel overlay on")


def test_index_off_mounts_an_upper_in_use(lay: Layers, form: Form) -> None:
    """The kernel's override: with index=off the second mount goes ahead (with a warning)."""
    mnt2 = lay.root / "mnt2"
    mnt2.mkdir()
    with _first_mount(lay, form, ",index=off"):
        opts = opts_of(lay.lowers, lay.upper, lay.work) + ",index=off"
        r = subprocess.run([sys.executable, "-m", "overlayfuse", *form(opts, str(mnt2))],
                           capture_output=True, text=True, env=cli_env(), timeout=60,
                           stdin=subprocess.DEVNULL)
        try:
            assert r.returncode == 0, r.stderr
            assert is_mounted(mnt2)
            assert sorted(os.listdir(mnt2)) == sorted(os.listdir(lay.mnt))
        finally:
            assert force_unmount(mnt2)


def test_missing_mount_point(lay: Layers, form: Form) -> None:
    mnt = lay.root / "nomnt"
    assert_refused(lay.root, form(opts_of(lay.lowers, lay.upper, lay.work), str(mnt)), mnt,
                   str(mnt), "does not exist")


# -- options ----------------------------------------------------------------------------------

def test_unknown_option(lay: Layers, form: Form) -> None:
    opts = opts_of(lay.lowers, lay.upper, lay.work) + ",frobnicate=7"
    assert_refused(lay.root, form(opts, str(lay.mnt)), lay.mnt, "frobnicate")


# -- FUSE prerequisites -----------------------------------------------------------------------

def test_missing_dev_fuse(lay: Layers, fuse_form: Form) -> None:
    """A private mount namespace whose /dev is an empty tmpfs: /dev/fuse really is missing."""
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs -o size=64k,mode=755 nodev /dev && exec "$@"', "sh"]
    assert_refused(lay.root, fuse_form(opts_of(lay.lowers, lay.upper, lay.work), str(lay.mnt)),
                   lay.mnt, "/dev/fuse", prefix=prefix)


def test_missing_fusermount3(unprivileged, fuse_form: Form) -> None:  # noqa: ANN001
    """A normal user in a mount namespace where fusermount3 is an empty, non-executable file:
    neither PATH nor libfuse's built-in path can run it."""
    fusermount = shutil.which("fusermount3")
    assert fusermount, "fusermount3 is needed on the test machine"
    u = unprivileged
    layers = u.make_layers()
    dummy = u.home / "not-fusermount3"
    dummy.write_bytes(b"")
    dummy.chmod(0o644)
    argv = fuse_form(opts_of(layers.lowers, layers.upper, layers.work), str(layers.mnt))
    inner = u.argv([u.python, "-m", "overlayfuse", *argv])
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    before = snapshot(layers.root)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        str(dummy), os.path.realpath(fusermount), *inner],
                       capture_output=True, text=True, env=u.env(), cwd=str(u.home),
                       stdin=subprocess.DEVNULL, timeout=60)
    if is_mounted(layers.mnt):
        force_unmount(layers.mnt, u)
        pytest.fail("mounted without fusermount3")
    assert r.returncode != 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: "), r.stderr
    assert "Traceback" not in r.stderr
    assert "fusermount3" in lines[0], lines[0]
    assert snapshot(layers.root) == before
