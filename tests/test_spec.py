"""Option strings <-> OverlaySpec: the grammar shared by mount(8), fuse-overlayfs and us."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlayfuse.errors import OverlayfuseError
from overlayfuse.spec import OverlaySpec, escape, parse_options, split_unescaped, unescape


def test_lowers_top_first_upper_work_volatile() -> None:
    spec, other = parse_options("lowerdir=/a:/b:/c,upperdir=/u,workdir=/w,volatile", cwd="/")
    assert spec.lowerdirs == ("/a", "/b", "/c")
    assert (spec.upperdir, spec.workdir, spec.volatile) == ("/u", "/w", True)
    assert not spec.readonly
    assert other == ()


def test_read_only_overlay_has_no_upper() -> None:
    spec, _ = parse_options("lowerdir=/a", cwd="/")
    assert spec == OverlaySpec(lowerdirs=("/a",))
    assert spec.readonly


def test_empty_items_are_ignored() -> None:
    spec, other = parse_options(",,lowerdir=/a,,upperdir=/u,workdir=/w,,volatile,,", cwd="/")
    assert spec == OverlaySpec(("/a",), "/u", "/w", volatile=True)
    assert other == ()


def test_escapes_in_paths() -> None:
    spec, _ = parse_options(r"lowerdir=/x\:y:/p\,q:/back\\slash,upperdir=/u\,1,workdir=/w\:2",
                            cwd="/")
    assert spec.lowerdirs == ("/x:y", "/p,q", "/back\\slash")
    assert (spec.upperdir, spec.workdir) == ("/u,1", "/w:2")


def test_relative_lowers_and_relative_symlinks_resolve_from_cwd(tmp_path: Path) -> None:
    (tmp_path / "real" / "l1").mkdir(parents=True)
    (tmp_path / "l2").mkdir()
    (tmp_path / "links").mkdir()
    os.symlink("../real/l1", tmp_path / "links" / "top")  # a relative symlink
    spec, _ = parse_options("lowerdir=links/top:./l2,upperdir=u,workdir=w", cwd=str(tmp_path))
    assert spec.lowerdirs == (str(tmp_path / "real" / "l1"), str(tmp_path / "l2"))
    assert (spec.upperdir, spec.workdir) == (str(tmp_path / "u"), str(tmp_path / "w"))


def test_cwd_defaults_to_the_process_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "l").mkdir()
    monkeypatch.chdir(tmp_path)
    assert OverlaySpec.from_options("lowerdir=l").lowerdirs == (str(tmp_path / "l"),)


def test_overlay_options_kept_in_order() -> None:
    spec, other = parse_options("lowerdir=/a,redirect_dir=on,index=on,xino=auto,metacopy=off,"
                                "userxattr,nfs_export=on,uuid=null", cwd="/")
    assert spec.options == (("redirect_dir", "on"), ("index", "on"), ("xino", "auto"),
                            ("metacopy", "off"), ("userxattr", None), ("nfs_export", "on"),
                            ("uuid", "null"))
    assert spec.option("index") == "on"
    assert spec.option("verity", "off") == "off"
    assert other == ()


def test_harmless_options_come_back_separately() -> None:
    text = ("lowerdir=/a,upperdir=/u,workdir=/w,ro,rw,lazytime,noatime,nodev,nosuid,noexec,dev,"
            "suid,exec,atime,relatime,strictatime,fsync=0,noacl,"
            'context="system_u:object_r:container_file_t:s0:c1,c2",fscontext=a,defcontext=b,'
            "rootcontext=c,allow_other,default_permissions,max_read=131072,x-systemd.automount")
    spec, other = parse_options(text, cwd="/")
    # noacl is a FUSE tuning (no ACL enforcement), kept for the daemon, not a harmless option
    assert spec == OverlaySpec(("/a",), "/u", "/w", fuse_options=(("noacl", None),))
    assert other == ("ro", "rw", "lazytime", "noatime", "nodev", "nosuid", "noexec", "dev",
                     "suid", "exec", "atime", "relatime", "strictatime", "fsync=0",
                     'context="system_u:object_r:container_file_t:s0:c1,c2"', "fscontext=a",
                     "defcontext=b", "rootcontext=c", "allow_other", "default_permissions",
                     "max_read=131072", "x-systemd.automount")


@pytest.mark.parametrize("text, name", [
    ("lowerdir=/a,bogus", "bogus"),
    ("lowerdir=/a,frobnicate=1", "frobnicate"),
    ("lowerdir=/a,redirect_dir", "redirect_dir"),   # a key without its value
    ("lowerdir=/a,userxattr=1", "userxattr"),       # a flag with a value
])
def test_unknown_option_is_named(text: str, name: str) -> None:
    with pytest.raises(OverlayfuseError, match=name):
        parse_options(text, cwd="/")


@pytest.mark.parametrize("text, fragment", [
    ("upperdir=/u,workdir=/w", "lowerdir"),
    ("lowerdir=", "lowerdir"),
    ("lowerdir=/a::/b", "empty lower dir"),
    ("lowerdir=/a,upperdir=/u", "workdir"),
    ("lowerdir=/a,workdir=/w", "upperdir"),
])
def test_incomplete_specs_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(OverlayfuseError, match=fragment):
        parse_options(text, cwd="/")


def test_later_path_option_replaces_earlier() -> None:
    spec, _ = parse_options("lowerdir=/a,upperdir=/u,workdir=/w,lowerdir=/b", cwd="/")
    assert spec.lowerdirs == ("/b",)


def test_to_options_escapes_and_round_trips() -> None:
    spec = OverlaySpec(lowerdirs=("/l:1", "/l,2", "/l\\3"), upperdir="/u,x", workdir="/w:y",
                       volatile=True, options=(("redirect_dir", "on"), ("userxattr", None)))
    text = spec.to_options()
    assert text == (r"lowerdir=/l\:1:/l\,2:/l\\3,upperdir=/u\,x,workdir=/w\:y,volatile,"
                    "redirect_dir=on,userxattr")
    assert parse_options(text, cwd="/") == (spec, ())


def test_split_and_unescape_helpers() -> None:
    assert split_unescaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert split_unescaped('k="x,y",z', ",") == ['k="x,y"', "z"]
    assert unescape(r"a\:b\\c") == "a:b\\c"
    assert escape("a:b,c\\\"") == r"a\:b\,c\\\""


# absolute, normalized path names without symlinks to resolve (they name nothing on disk)
_component = st.text(alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                     min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_path = st.lists(_component, min_size=1, max_size=3).map(
    lambda parts: "/nonexistent-ovf-test/" + "/".join(parts))


@settings(max_examples=200, deadline=None)
@given(lowers=st.lists(_path, min_size=1, max_size=4), upper=_path, work=_path,
       volatile=st.booleans())
def test_round_trip_any_path(lowers: list[str], upper: str, work: str, volatile: bool) -> None:
    spec = OverlaySpec(tuple(lowers), upper, work, volatile, (("index", "on"),))
    assert parse_options(spec.to_options(), cwd="/") == (spec, ())
