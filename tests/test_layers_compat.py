"""One on-disk format for every backend: layers written by one are read the same by the other.

The differential tests cross-mount uppers with fresh work dirs. These tests take the stricter
view of a container engine that switches backends between two runs: the upper *and its work
dir* are handed over unchanged, and the other backend must show exactly the tree the writer
showed. Each scenario is a short script of operations aimed at one piece of the format
(copy-up, whiteouts, opaque dirs, redirects, hard links, renames). Further tests read the
forms of the format that only some writers produce: OCI `.wh.` whiteouts and opaque markers,
the `user.overlay.*` namespace, and a stack of many lowers; the kernel reading the equivalent
kernel-form layers is the oracle.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from mounts import kernel_overlay
from ops import (
    OUTSIDE, RENAME_EXCHANGE, SUT, Ctx, Op, Outcome, Snapshot, apply, build_lowers, diff_snapshots, overlay_markers,
    snapshot_tree, sut_mount,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlay mounts need root")

SCENARIOS: dict[str, list[Op]] = {
    "copy_up": [
        Op("write", ("f1", 3, b"A")), Op("chmod", ("m/x", 0o600)), Op("chown", ("e", (1001, 1001), True)),
        Op("setxattr", ("xf", "user.k1", b"v1", 0)), Op("utime", ("d/e/f", 1_111_111_111 * 10**9)),
        Op("append", ("su", b"echo\n")), Op("truncate", ("rd/r", 3)),
    ],
    "whiteouts": [
        Op("unlink", ("f1",)), Op("unlink", ("m/x",)), Op("unlink", ("d/e/f",)), Op("rmdir", ("d/e",)),
        Op("rmdir", ("d",)), Op("create", ("w", b"back over a lower whiteout\n")),
        Op("unlink", ("xw/keep",)), Op("unlink", ("s_rel",)), Op("unlink", ("p",)),
    ],
    "opaque": [
        Op("unlink", ("o/vis",)), Op("rmdir", ("o",)), Op("mkdir", ("o", 0o755)),
        Op("create", ("o/n1", b"new in a recreated dir\n")), Op("unlink", ("dm/a",)),
        Op("unlink", ("dm/sub/q",)), Op("rmdir", ("dm/sub",)), Op("rmdir", ("dm",)), Op("mkdir", ("dm", 0o700)),
    ],
    "redirect": [
        Op("rename", ("dm", "n1", 0)), Op("rename", ("m", "nd", 0)), Op("mkdir", ("m", 0o755)),
        Op("rename", ("n1/sub", "m/n1", 0)), Op("rename", ("d/e", "n2", 0)), Op("create", ("d/e", b"file now\n")),
        Op("rename", ("nd/x", "n1/x", 0)),
    ],
    "hardlinks": [
        Op("link", ("hl1", "n1")), Op("append", ("hl2", b"more\n")), Op("link", ("m/x", "m/n1")),
        Op("chmod", ("m/x", 0o600)), Op("unlink", ("hl1",)),
    ],
    "renamed_links": [  # unionmount-testsuite's rename-hard-link, on a lower pair
        Op("rename", ("hl2", "n1", 0)), Op("rename", ("n1", "n2", 0)), Op("rename", ("n2", "n1", 0)),
        Op("rename", ("hl1", "n3", 0)), Op("append", ("n3", b"via the renamed name\n")),
    ],
    "exchange": [
        Op("rename", ("f1", "e", RENAME_EXCHANGE)), Op("rename", ("m", "o", RENAME_EXCHANGE)),
        Op("rename", ("s_dir", "xf", RENAME_EXCHANGE)),
    ],
    "special": [
        Op("symlink", (OUTSIDE, "n1")), Op("rename", ("p", "n2", 0)), Op("mkfifo", ("m/n1",)),
        Op("rename", ("s_abs", "o/vis", 0)), Op("chown", ("s_rel", (1000, 1000), False)),
    ],
}


@pytest.fixture(scope="module")
def lowers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_lowers(tmp_path_factory.mktemp("compat") / "lowers")


def _dirs(base: Path) -> tuple[Path, Path, Path]:
    dirs = (base / "upper", base / "work", base / "mnt")
    for d in dirs:
        d.mkdir(parents=True)
    return dirs


def _run(ops: Sequence[Op], mnt: Path) -> list[Outcome]:
    ctx = Ctx(str(mnt))
    try:
        return [apply(op, ctx) for op in ops]
    finally:
        ctx.close_all()


def _assert_same(expected: Snapshot, got: Snapshot, what: str) -> None:
    diffs = diff_snapshots(expected, got, "writer", "reader")
    assert not diffs, f"{what}: trees differ\n" + "\n".join(diffs)
    bad = overlay_markers(got)
    assert not bad, f"{what}: overlay markers visible\n" + "\n".join(bad)


def _ops_ok(outcomes: list[Outcome], ops: Sequence[Op]) -> None:
    """The scripts are written to succeed; a failing step would make the scenario vacuous."""
    failed = [(op, r) for op, r in zip(ops, outcomes) if r[0] != "ok"]
    assert not failed, f"scenario steps failed: {failed}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_kernel_upper_read_by_sut(name: str, lowers: list[Path], tmp_path: Path) -> None:
    """The kernel writes; the system under test mounts upper and work dir unchanged."""
    upper, work, mnt = _dirs(tmp_path / "k")
    with kernel_overlay(lowers, upper, work, mnt):
        _ops_ok(_run(SCENARIOS[name], mnt), SCENARIOS[name])
        written = snapshot_tree(mnt)
    with sut_mount(lowers, upper, work, mnt):
        read = snapshot_tree(mnt)
    _assert_same(written, read, f"{name}: kernel-written layers read by {SUT}")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sut_upper_read_by_kernel(name: str, lowers: list[Path], tmp_path: Path) -> None:
    """The system under test writes; the kernel mounts upper and work dir unchanged.

    The writer's own view is first checked against the kernel doing the same script, so a
    difference here is the format's fault, not the operations'.
    """
    kupper, kwork, kmnt = _dirs(tmp_path / "k")
    with kernel_overlay(lowers, kupper, kwork, kmnt):
        _ops_ok(_run(SCENARIOS[name], kmnt), SCENARIOS[name])
        oracle = snapshot_tree(kmnt)
    upper, work, mnt = _dirs(tmp_path / "s")
    with sut_mount(lowers, upper, work, mnt):
        _ops_ok(_run(SCENARIOS[name], mnt), SCENARIOS[name])
        written = snapshot_tree(mnt)
    _assert_same(oracle, written, f"{name}: {SUT} doing the script vs the kernel")
    with kernel_overlay(lowers, upper, work, mnt):
        read = snapshot_tree(mnt)
    _assert_same(written, read, f"{name}: {SUT}-written layers read by the kernel")


# ----------------------------------------------------------------------- forms only some write

def _layer_pair(base: Path, form: str) -> list[Path]:
    """Two lowers whose top one marks a whiteout and an opaque dir in the given form."""
    top, bottom = base / "top", base / "bottom"
    for d in (top / "d", top / "od", bottom / "d", bottom / "od"):
        d.mkdir(parents=True)
    for rel in ("a", "keep", "d/x", "d/y", "od/h"):
        (bottom / rel).write_bytes(f"{rel} bottom\n".encode())
    (top / "od" / "v").write_bytes(b"od/v top\n")
    (top / "t").write_bytes(b"t top\n")
    if form == "oci":
        (top / ".wh.a").write_bytes(b"")
        (top / "d" / ".wh.x").write_bytes(b"")
        (top / "od" / ".wh..wh..opq").write_bytes(b"")
    else:
        ns = "user" if form == "user" else "trusted"
        for rel in ("a", "d/x"):
            os.mknod(top / rel, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(top / "od", f"{ns}.overlay.opaque", b"y")
    return [top, bottom]


NOT_KERNEL = pytest.mark.skipif(SUT == "kernel", reason="the kernel itself does not read this form")


@NOT_KERNEL
def test_oci_form_reads_like_kernel_form(tmp_path: Path) -> None:
    """OCI `.wh.NAME` and `.wh..wh..opq` markers mean what the kernel's own form means."""
    form = "oci"
    oracle_lowers = _layer_pair(tmp_path / "kernel-form", "kernel")
    lowers = _layer_pair(tmp_path / form, form)
    (tmp_path / "km").mkdir()
    (tmp_path / "sm").mkdir()
    with kernel_overlay(oracle_lowers, None, None, tmp_path / "km", opts=""):
        oracle = snapshot_tree(tmp_path / "km")
    assert "a" not in oracle.entries and "od/h" not in oracle.entries  # the oracle itself is sane
    with sut_mount(lowers, None, None, tmp_path / "sm"):
        got = snapshot_tree(tmp_path / "sm")
    _assert_same(oracle, got, f"{form}-form layers read by {SUT}")


@NOT_KERNEL
def test_user_namespace_matches_kernel_userxattr(tmp_path: Path) -> None:
    """The kernel's `userxattr` option reads `user.overlay.*`; so must the system under test
    given the same option (without it, as root, those are ordinary xattrs, as for the kernel)."""
    lowers = _layer_pair(tmp_path / "user", "user")
    (tmp_path / "km").mkdir()
    (tmp_path / "sm").mkdir()
    with kernel_overlay(lowers, None, None, tmp_path / "km", opts="userxattr"):
        oracle = snapshot_tree(tmp_path / "km")
    with sut_mount(lowers, None, None, tmp_path / "sm", extra=("userxattr",)):
        got = snapshot_tree(tmp_path / "sm")
    _assert_same(oracle, got, f"user.overlay layers read by {SUT}")


def test_many_lowers(tmp_path: Path) -> None:
    """Fifty lowers, each adding, hiding and overriding names of the ones below."""
    lowers = []
    for i in range(50):
        d = tmp_path / "layers" / f"l{i:02d}"
        (d / "common").mkdir(parents=True)
        (d / f"only{i}").write_bytes(f"{i}\n".encode())
        (d / "common" / f"c{i}").write_bytes(f"c{i}\n".encode())
        (d / "shadowed").write_bytes(f"layer {i}\n".encode())
        if i % 7 == 3:  # hides the names of the layer just below it
            os.mknod(d / f"only{i + 1}", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
            os.mknod(d / "common" / f"c{i + 1}", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        if i == 40:
            os.setxattr(d / "common", "trusted.overlay.opaque", b"y")
        lowers.append(d)  # top first: l00 is the top layer
    (tmp_path / "km").mkdir()
    (tmp_path / "sm").mkdir()
    with kernel_overlay(lowers, None, None, tmp_path / "km", opts=""):
        oracle = snapshot_tree(tmp_path / "km")
    assert oracle.entries["shadowed"]["data"] == b"layer 0\n"
    with sut_mount(lowers, None, None, tmp_path / "sm"):
        got = snapshot_tree(tmp_path / "sm")
    _assert_same(oracle, got, f"50 lowers read by {SUT}")


def _stacked_layers(base: Path, form: str, n: int = 12) -> tuple[list[Path], list[str]]:
    """*n* lowers sharing dir ``d``: each adds names, overrides ``shared``, and some hide a
    name of a layer below (whiteout in *form*) or turn ``d/sub`` opaque.  Returns the lowers
    (top first) and every name any layer has, hidden or not."""
    lowers, names = [], {"shared", "sub", "sub/s", "nothing"}
    for i in range(n):
        d = base / f"l{i:02d}" / "d"
        (d / "sub").mkdir(parents=True)
        for rel in (f"own{i}", "shared", f"sub/s{i}"):
            (d / rel).write_bytes(f"{rel} in layer {i}\n".encode())
            names.add(rel.replace(str(i), "{}").format(i))
        if i % 4 == 1:  # hide the names the next two layers add
            for j in (i + 1, i + 2):
                if form == "oci":
                    (d / f".wh.own{j}").write_bytes(b"")
                else:
                    os.mknod(d / f"own{j}", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        if i == 6:
            if form == "oci":
                (d / "sub" / ".wh..wh..opq").write_bytes(b"")
            else:
                os.setxattr(d / "sub", "trusted.overlay.opaque", b"y")
        lowers.append(base / f"l{i:02d}")
    names |= {f"own{i}" for i in range(n + 2)} | {f"sub/s{i}" for i in range(n)}
    return lowers, sorted(names)


def _cold_lookups(mnt: Path, names: list[str], rounds: int) -> list[tuple[str, object]]:
    """List ``d`` (the daemon learns the layers' names), then look every name up with the
    kernel's dentries dropped, so each lookup reaches the filesystem."""
    seen: list[tuple[str, object]] = []
    for _ in range(rounds):
        os.listdir(mnt / "d")
        os.listdir(mnt / "d" / "sub")
        Path("/proc/sys/vm/drop_caches").write_text("2")
        seen = []
        for rel in names:
            p = mnt / "d" / rel
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                seen.append((rel, "absent"))
                continue
            seen.append((rel, p.read_bytes() if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)))
    return seen


@pytest.mark.parametrize("form", ["kernel", pytest.param("oci", marks=NOT_KERNEL)])
def test_lookups_through_many_lowers(form: str, tmp_path: Path) -> None:
    """Lookups in a dir merged from many lowers (which the daemon answers from the layers' name
    sets once it knows them) find what the kernel finds: the top entry, nothing past a whiteout,
    nothing below an opaque dir."""
    oracle_lowers, names = _stacked_layers(tmp_path / "kernel-form", "kernel")
    lowers, _ = _stacked_layers(tmp_path / form, form)
    (tmp_path / "km").mkdir()
    (tmp_path / "sm").mkdir()
    with kernel_overlay(oracle_lowers, None, None, tmp_path / "km", opts=""):
        oracle = _cold_lookups(tmp_path / "km", names, 1)
    assert ("own2", "absent") in oracle and ("sub/s8", "absent") in oracle  # a sane oracle
    assert ("shared", b"shared in layer 0\n") in oracle
    with sut_mount(lowers, None, None, tmp_path / "sm"):
        got = _cold_lookups(tmp_path / "sm", names, 5)
    assert got == oracle


def test_read_only_mount_refuses_writes(lowers: list[Path], tmp_path: Path) -> None:
    """A lowerdir-only mount shows the same tree and answers writes the way the kernel does."""
    probe = [Op("create", ("n1", b"A")), Op("unlink", ("f1",)), Op("mkdir", ("nd", 0o755)),
             Op("chmod", ("f1", 0o600)), Op("setxattr", ("xf", "user.k1", b"v", 0)), Op("read", ("m/x",))]
    (tmp_path / "km").mkdir()
    (tmp_path / "sm").mkdir()
    with kernel_overlay(lowers, None, None, tmp_path / "km", opts=""):
        oracle, k_out = snapshot_tree(tmp_path / "km"), _run(probe, tmp_path / "km")
    assert k_out[0] == ("err", "EROFS")
    with sut_mount(lowers, None, None, tmp_path / "sm"):
        got, s_out = snapshot_tree(tmp_path / "sm"), _run(probe, tmp_path / "sm")
    assert s_out == k_out
    _assert_same(oracle, got, f"read-only mount by {SUT}")
