"""fuse-overlayfs' own options (uidmapping=, squash_to_*, static_nlink, timeout=, ...).

First the option layer alone (parsing, ranges, which options need FUSE), then every option
through the three command-line forms that mount (``overlayfuse mount``, the fuse-overlayfs form
``overlayfuse -o OPTS MNT`` and mount.fuse3's ``overlayfuse SOURCE MNT -o OPTS``) and ``run``,
with real mounts and the effect checked with stat; bad values end as one line on stderr.
"""
from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mounts import REPO, esc, force_unmount, is_mounted, make_layers, overlayfuse_pids
from overlayfuse.errors import OverlayfuseError
from overlayfuse.fusefs import override
from overlayfuse.fusefs.overlay import WRITEBACK_ENV, Config
from overlayfuse.idmap import IdMap, Owners, owners_from_options
from overlayfuse.spec import OverlaySpec, parse_options

MAP = "uidmapping=0:100000:65536,gidmapping=0:100000:65536"


# -- the option layer -------------------------------------------------------------------------

def test_idmap_shows_disk_ids_through_the_ranges() -> None:
    m = IdMap.parse("0:1000:1:1:110000:65536")
    assert [m.shown(i, 65534) for i in (0, 1, 2, 65536, 65537)] == [1000, 110000, 110001,
                                                                  175535, 65534]
    assert [m.disk(i) for i in (1000, 110000, 175535, 999, 175536)] == [0, 1, 65536, None, None]
    assert IdMap().shown(7, 65534) == 7 and IdMap().disk(7) == 7


def test_idmap_accepts_what_container_engines_write() -> None:
    # containers/storage writes a leading ':'; fuse-overlayfs skips empty fields
    assert IdMap.parse(":0:100000:65536") == IdMap.parse("0:100000:65536")
    # the man page's form: further ranges after a ',' (a separate item of the option string)
    spec, _ = parse_options("lowerdir=/a,uidmapping=0:1000:1,1:110000:65536,gidmapping=0:5:1",
                            cwd="/")
    assert spec.fuse_option_map() == {"uidmapping": "0:1000:1:1:110000:65536",
                                      "gidmapping": "0:5:1"}


@pytest.mark.parametrize("value, fragment", [
    ("", "expected ID:MAPPED-ID:LENGTH"),
    ("0:1000", "expected ID:MAPPED-ID:LENGTH"),
    ("0:1000:x", "expected ID:MAPPED-ID:LENGTH"),
    ("0:-1:5", "expected ID:MAPPED-ID:LENGTH"),
    ("0:1000:0", "is empty"),
    ("4294967290:0:10", "goes past the largest ID"),
    ("0:4294967290:10", "goes past the largest ID"),
    ("0:1000:10:5:2000:10", "overlap on the on-disk side"),
    ("0:1000:10:20:1005:10", "overlap on the mapped side"),
])
def test_bad_mappings_are_one_line_errors(value: str, fragment: str) -> None:
    with pytest.raises(OverlayfuseError, match=fragment) as e:
        parse_options(f"lowerdir=/a,uidmapping={value}", cwd="/")
    assert "\n" not in str(e.value)


def test_squash_shows_everyone_as_one_owner_and_keeps_writes_mapped() -> None:
    o = owners_from_options({"squash_to_root": None, "squash_to_gid": "7",
                             "uidmapping": "0:100:10"})
    assert o.shown(3, 5) == (0, 7) and o.squashed
    assert o.disk_uid(105) == 5 and o.disk_uid(3) is None  # writes still go through the map
    assert Owners().identity and not Owners().squashed


@pytest.mark.parametrize("item, needs_fuse", [
    ("uidmapping=0:1:1", True), ("gidmapping=0:1:1", True), ("squash_to_root", True),
    ("squash_to_uid=5", True), ("squash_to_gid=5", True), ("static_nlink", True),
    ("timeout=5", False), ("noacl", False), ("threaded=1", False), ("fast_ino=1", False),
    ("writeback=0", False), ("xattr_permissions=0", False), ("noxattrs=1", True),
    ("spin=0", False), ("spin=200", False), ("readdirplus_auto", False),
    ("noxattrs=0", False), ("fsync=0", False), ("xattr_permissions=1", True),
    ("xattr_permissions=2", True),
])
def test_which_options_only_fuse_can_honour(item: str, needs_fuse: bool) -> None:
    spec, _ = parse_options(f"lowerdir=/a,{item}", cwd="/")
    assert (spec.needs_fuse is not None) == needs_fuse
    if needs_fuse:
        assert item.partition("=")[0] in spec.needs_fuse
    # the option string of the spec reads back to the same spec
    assert parse_options(spec.to_options(), cwd="/")[0] == spec


@pytest.mark.parametrize("value, parsed", [
    (b"0:0:40755", (0, 0, 0o755)),              # 1.10 writes the file type bits too
    (b"1000:1000:100644", (1000, 1000, 0o644)),
    (b"5:6:4750", (5, 6, 0o4750)),
    (b"1:2:644:file", (1, 2, 0o644)),           # 1.15's form: the type is not used
    (b"-1:9:755", (4294967295, 9, 0o755)),      # 1.10's "unchanged", read as it reads it
    (b"1:2", None), (b"a:b:644", None), (b"1:2:9", None), (b"1:2:", None),
])
def test_override_values(value: bytes, parsed: tuple[int, int, int] | None) -> None:
    assert override.parse(value) == parsed
    if parsed is not None and parsed[0] < 1 << 31:
        assert override.parse(override.encode(*parsed)) == parsed


def test_daemon_config_from_the_options() -> None:
    spec, _ = parse_options("lowerdir=/a,timeout=2.5,static_nlink,squash_to_uid=9", cwd="/")
    config = Config.for_spec(spec, as_root=True)
    assert (config.entry_timeout, config.attr_timeout) == (2.5, 2.5)
    assert config.static_nlink and config.owners.shown(1, 2) == (9, 2)
    default = Config.for_spec(OverlaySpec(("/a",)), as_root=False)
    assert default.owners.identity and not default.static_nlink
    assert default.xattr_permissions == 0
    spec, _ = parse_options("lowerdir=/a,xattr_permissions=2", cwd="/")
    assert Config.for_spec(spec, as_root=False).xattr_permissions == 2
    assert default.spin_us == 200
    spec, _ = parse_options("lowerdir=/a,spin=0", cwd="/")
    assert Config.for_spec(spec, as_root=False).spin_us == 0
    assert not default.readdirplus_auto
    spec, _ = parse_options("lowerdir=/a,readdirplus_auto", cwd="/")
    assert Config.for_spec(spec, as_root=False).readdirplus_auto


def test_writeback_from_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WRITEBACK_ENV, raising=False)
    for opts, on in (("", False), (",writeback=0", False), (",writeback=1", True)):
        spec, _ = parse_options(f"lowerdir=/a{opts}", cwd="/")
        assert Config.for_spec(spec, as_root=True).writeback == on, opts
    monkeypatch.setenv(WRITEBACK_ENV, "1")
    assert Config.for_spec(OverlaySpec(("/a",)), as_root=True).writeback


# -- through the command line, with real mounts -----------------------------------------------

pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="these tests mount as root")

FORMS: dict[str, Callable[[str, str], list[str]]] = {
    "mount": lambda opts, mnt: ["mount", "-o", opts, mnt],
    "fuse-overlayfs": lambda opts, mnt: ["-o", opts, mnt],
    "mount.fuse3": lambda opts, mnt: ["overlayfuse", mnt, "-o", opts],
}


def ovf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayfuse", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, stdin=subprocess.DEVNULL, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@contextlib.contextmanager
def cli_mounted(mnt: Path) -> Iterator[None]:
    """Unmount after the block whatever happened, and see the daemon go."""
    try:
        yield
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
        deadline = time.monotonic() + 10
        while overlayfuse_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not overlayfuse_pids(mnt), f"a daemon outlived the unmount of {mnt}"


@pytest.fixture
def owned(tmp_path: Path):  # noqa: ANN201 - mounts.Layers
    """A lower with entries owned by 0, 1 and an ID no mapping here holds (70000)."""
    lay = make_layers(tmp_path / "t", n_lowers=1)
    low = lay.lowers[0]
    for name, owner in (("root", 0), ("one", 1), ("far", 70000)):
        (low / name).write_text(name)
        os.chown(low / name, owner, owner)
    (low / "dir" / "sub").mkdir(parents=True)
    (low / "dir" / "sub2").mkdir()
    return lay


def layer_opts(lay) -> str:  # noqa: ANN001
    return (f"lowerdir={esc(lay.lowers[0])},upperdir={esc(lay.upper)},"
            f"workdir={esc(lay.work)}")


def owners_in(mnt: Path, *names: str) -> list[tuple[int, int]]:
    return [(st.st_uid, st.st_gid) for st in (os.lstat(mnt / n) for n in names)]


@pytestmark_root
@pytest.mark.parametrize("form", sorted(FORMS))
def test_mapping_through_each_form(owned, form: str) -> None:  # noqa: ANN001
    """Owners shown through the mapping; a chown maps back to the on-disk ID; a chown to an
    ID no range maps is EINVAL and changes nothing."""
    mnt = owned.mnt
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},{MAP}", str(mnt)))
        assert r.returncode == 0, r.stderr
        assert owners_in(mnt, "root", "one", "far") == [(100000, 100000), (100001, 100001),
                                                        (65534, 65534)]
        os.chown(mnt / "one", 100005, 100006)
        assert owners_in(mnt, "one") == [(100005, 100006)]
        assert owners_in(owned.upper, "one") == [(5, 6)]
        with pytest.raises(OSError) as e:
            os.chown(mnt / "root", 5, 5)
        assert e.value.errno == 22  # EINVAL
        assert not (owned.upper / "root").exists()  # refused before any copy-up


@pytestmark_root
@pytest.mark.parametrize("form", sorted(FORMS))
def test_squash_and_static_nlink_through_each_form(owned, form: str) -> None:  # noqa: ANN001
    mnt = owned.mnt
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},squash_to_root,squash_to_gid=42,"
                             "static_nlink,timeout=0.5", str(mnt)))
        assert r.returncode == 0, r.stderr
        assert owners_in(mnt, "root", "one", "far", "dir") == [(0, 42)] * 4
        assert os.stat(mnt / "dir").st_nlink == 1  # 4 on disk: two subdirs
        assert os.stat(owned.lowers[0] / "dir").st_nlink == 4
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},squash_to_uid=7", str(mnt)))
        assert r.returncode == 0, r.stderr
        assert owners_in(mnt, "root", "far") == [(7, 0), (7, 70000)]
        assert os.stat(mnt / "dir").st_nlink == 4  # without static_nlink: the real count


@pytestmark_root
def test_ignored_options_are_said_with_verbose(owned) -> None:  # noqa: ANN001
    mnt = owned.mnt
    with cli_mounted(mnt):
        r = ovf("mount", "-v", "-o", f"{layer_opts(owned)},threaded=1,fast_ino=1,writeback=0,"
                "noacl,xattr_permissions=0,fsync=0,noxattrs=0", str(mnt))
        assert r.returncode == 0, r.stderr
        for key in ("threaded=1", "fast_ino=1", "writeback=0", "xattr_permissions=0",
                    "fsync=0", "noxattrs=0"):
            assert f"option {key} accepted and ignored: " in r.stderr
        assert (mnt / "root").read_text() == "root"
    with cli_mounted(mnt):  # without -v the drop-in form says nothing: engines parse stderr
        r = ovf("-o", f"{layer_opts(owned)},threaded=1,noacl", str(mnt))
        assert (r.returncode, r.stderr) == (0, "")


@pytestmark_root
@pytest.mark.parametrize("form", sorted(FORMS))
def test_noxattrs_through_each_form(owned, form: str) -> None:  # noqa: ANN001
    """``noxattrs=1``: the mount has no xattrs (EOPNOTSUPP), the layers keep theirs."""
    os.setxattr(owned.lowers[0] / "root", "user.k", b"v")
    mnt = owned.mnt
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},noxattrs=1", str(mnt)))
        assert r.returncode == 0, r.stderr
        for call in (lambda: os.getxattr(mnt / "root", "user.k"),
                     lambda: os.listxattr(mnt / "root"),
                     lambda: os.setxattr(mnt / "one", "user.k", b"w")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == 95  # EOPNOTSUPP
        assert not (owned.upper / "one").exists()
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},noxattrs=0", str(mnt)))
        assert r.returncode == 0, r.stderr
        assert os.getxattr(mnt / "root", "user.k") == b"v"


XP_NAME = {"1": "security.fuseoverlayfs.override_stat", "2": "user.fuseoverlayfs.override_stat"}


@pytestmark_root
@pytest.mark.parametrize("level", ["1", "2"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_xattr_permissions_through_each_form(owned, form: str, level: str) -> None:  # noqa: ANN001
    """``xattr_permissions=1|2``: a chown and a chmod land in the upper's override xattr (the
    files stay root's on disk, mode | 0755), mapped like real owners; the xattr is hidden."""
    mnt, name = owned.mnt, XP_NAME[level]
    with cli_mounted(mnt):
        r = ovf(*FORMS[form](f"{layer_opts(owned)},{MAP},xattr_permissions={level}", str(mnt)))
        assert r.returncode == 0, r.stderr
        os.chmod(mnt / "root", 0o640)
        os.chown(mnt / "root", 100005, 100006)
        st = os.lstat(mnt / "root")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (100005, 100006, 0o640)
        disk = os.lstat(owned.upper / "root")
        assert (disk.st_uid, disk.st_gid, stat.S_IMODE(disk.st_mode)) == (0, 0, 0o755)
        assert os.getxattr(owned.upper / "root", name) == b"5:6:640"  # on-disk IDs
        os.chmod(mnt / "one", 0o4755)  # shown setuid; never a real setuid file of root's
        assert stat.S_IMODE(os.lstat(mnt / "one").st_mode) == 0o4755
        assert stat.S_IMODE(os.lstat(owned.upper / "one").st_mode) == 0o755
        assert name not in os.listxattr(mnt / "root")
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "root", name)
        assert e.value.errno == 61  # ENODATA
        with pytest.raises(OSError) as e:
            os.setxattr(mnt / "root", name, b"0:0:4755")
        assert e.value.errno == 1  # EPERM
    assert os.getxattr(owned.upper, name) == b"0:0:755"  # the upper's root says it uses it


@pytestmark_root
def test_run_with_xattr_permissions_reads_containers_layers(owned) -> None:  # noqa: ANN001
    """A lower laid out by containers/storage (``user.containers.override_stat``, its root
    marked) shows the stored owners and modes through ``run``, on FUSE (auto's choice)."""
    low = owned.lowers[0]
    os.setxattr(low, "user.containers.override_stat", b"0:0:755")
    os.setxattr(low / "one", "user.containers.override_stat", b"1000:1001:4750")
    os.setxattr(low / "dir", "user.containers.override_stat", b"7:8:700")
    r = ovf("run", "-v", "-o", f"lowerdir={esc(low)},xattr_permissions=2", "--",
            "stat", "-c", "%u:%g:%a", "one", "dir", "far")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1000:1001:4750", "7:8:700", "70000:70000:644"]
    assert "backend fuse (auto: xattr_permissions= can only be honoured by" in r.stderr


@pytestmark_root
def test_auto_picks_fuse_for_a_mapping_and_says_why(owned) -> None:  # noqa: ANN001
    mnt = owned.mnt
    with cli_mounted(mnt):
        r = ovf("mount", "--backend", "auto", "-v", "-o", f"{layer_opts(owned)},{MAP}",
                str(mnt))
        assert r.returncode == 0, r.stderr
        assert "backend fuse (auto: uidmapping=, gidmapping= can only be honoured by the " \
               "FUSE backend)" in r.stderr
        assert owners_in(mnt, "root") == [(100000, 100000)]


@pytestmark_root
@pytest.mark.parametrize("option, named", [("squash_to_root", "squash_to_root"),
                                           ("xattr_permissions=2", "xattr_permissions=")])
@pytest.mark.parametrize("backend", ["kernel", "kernel-userns"])
def test_a_forced_kernel_backend_refuses_fuse_only_options(owned, backend: str, option: str,  # noqa: ANN001
                                                           named: str) -> None:
    if backend == "kernel":
        r = ovf("mount", "--backend", backend, "-o", f"{layer_opts(owned)},{option}",
                str(owned.mnt))
    else:
        r = ovf("run", "--backend", backend, "-o", f"{layer_opts(owned)},{option}",
                "--", "true")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"overlayfuse: backend {backend} cannot {'mount' if backend == 'kernel' else 'run'} "
        f"this overlay: {named} can only be honoured by the FUSE backend"]
    assert not is_mounted(owned.mnt)


@pytestmark_root
def test_run_honours_the_mapping(owned) -> None:  # noqa: ANN001
    """``run`` takes the same options: auto goes to FUSE, the command sees mapped owners."""
    r = ovf("run", "-v", "-o", f"lowerdir={esc(owned.lowers[0])},{MAP},threaded=1", "--",
            "stat", "-c", "%u:%g", "root", "far")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["100000:100000", "65534:65534"]
    assert "backend fuse (auto: uidmapping=" in r.stderr
    assert "option threaded=1 accepted and ignored" in r.stderr


BAD = [
    ("uidmapping=0:1000", "uidmapping=0:1000: expected ID:MAPPED-ID:LENGTH"),
    ("gidmapping=0:10:5:3:12:4", "ranges overlap on the on-disk side"),
    ("uidmapping=1:4294967000:1000", "goes past the largest ID"),
    ("squash_to_uid=-3", "squash_to_uid=-3: expected a user or group ID"),
    ("squash_to_gid=4294967295", "squash_to_gid=4294967295: expected a user or group ID"),
    ("squash_to_root=1", "option squash_to_root takes no value"),
    ("static_nlink=yes", "option static_nlink takes no value"),
    ("uidmapping", "option uidmapping takes a value"),
    ("timeout=soon", "timeout=soon: expected seconds"),
    ("timeout=-1", "timeout=-1: expected seconds"),
    ("threaded=yes", "threaded=yes: expected a number"),
    ("writeback=on", "writeback=on: expected a number"),
    ("noacl=1", "option noacl takes no value"),
    ("noxattrs=all", "noxattrs=all: expected a number"),
    ("fsync=off", "fsync=off: expected a number"),
    ("xattr_permissions=3", "xattr_permissions=3: expected 0, 1 or 2"),
    ("xattr_permissions=-1", "xattr_permissions=-1: expected 0, 1 or 2"),
    ("xattr_permissions=user", "xattr_permissions=user: expected a number"),
    ("xattr_permissions", "option xattr_permissions takes a value"),
    ("spin=fast", "spin=fast: expected microseconds, 0 to 10000"),
    ("spin=-5", "spin=-5: expected microseconds"),
    ("spin=10001", "spin=10001: expected microseconds, 0 to 10000"),
    ("spin", "option spin takes a value"),
    ("plugins=/usr/lib/x.so", "option plugins is refused"),
    ("ino32_t", "option ino32_t is refused"),
]


@pytestmark_root
@pytest.mark.parametrize("form", [*sorted(FORMS), "run"])
@pytest.mark.parametrize("item, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_errors(owned, form: str, item: str, message: str) -> None:  # noqa: ANN001
    opts = f"{layer_opts(owned)},{item}"
    argv = (["run", "-o", opts, "--", "true"] if form == "run"
            else FORMS[form](opts, str(owned.mnt)))
    before = sorted(os.listdir(owned.upper)), sorted(os.listdir(owned.work))
    r = ovf(*argv)
    if is_mounted(owned.mnt):
        force_unmount(owned.mnt)
        pytest.fail(f"{item} was mounted instead of refused")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: "), r.stderr
    assert message in lines[0]
    assert (sorted(os.listdir(owned.upper)), sorted(os.listdir(owned.work))) == before

