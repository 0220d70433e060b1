"""Plain READDIR (``-o readdirplus_auto``, tools/pyfuse3/readdir-plain.patch, fusefs/readdir.py).

With the option the kernel asks attributes (READDIRPLUS) only for the first chunk of a listing
and where lookups in the directory follow; the rest of a big listing comes as plain READDIR,
names with an inode number and a type.  Those must be exactly what ``lstat`` of the
entry reports, for every kind of entry an overlay has (lower files of each layer, files
shadowing lower ones, copied-up and renamed files, hard links, new files, merged and opaque
dirs, symlinks, fifos), and whiteouts stay hidden; the names are those of the kernel's
overlay over the same layers after the same changes.  A listing only small enough for the
first chunk never meets the plain path, so the directory here is big, and the daemon's own
request log shows the plain READDIRs were sent.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pyfuse3
import pytest

from mounts import Layers, kernel_overlay, make_layers, overlayfuse_mount

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and whiteouts need root here"),
    pytest.mark.skipif(not hasattr(pyfuse3.ReaddirToken, "plus"),
                       reason="stock pyfuse3: every listing is READDIRPLUS"),
]

N = 1500  # files per lower in the big directory: far more than one chunk of READDIRPLUS


def _build(layers: Layers) -> None:
    low0, low1 = (p / "d" for p in layers.lowers)
    for d in (low0, low1):
        d.mkdir()
    for i in range(N):
        (low1 / f"a{i:04d}").write_bytes(b"a")
        (low0 / f"b{i:04d}").write_bytes(b"b")
    for i in range(20):
        (low1 / f"m{i:02d}").mkdir()
        (low1 / f"m{i:02d}" / "below").write_bytes(b"x")
        (low0 / f"m{i:02d}").mkdir()  # merged with the one below
        os.symlink(f"a{i:04d}", low1 / f"s{i:02d}")
        os.mkfifo(low1 / f"p{i:02d}")
    for i in range(50):
        os.mknod(low0 / f"a{i:04d}", stat.S_IFCHR | 0o600, 0)  # whiteouts hide a0000-a0049
    (low0 / "a0100").write_bytes(b"shadow")  # another inode than the one below
    os.link(low1 / "a0500", low1 / "hl")  # a lower hard link


def _change(m: Path) -> None:
    d = m / "d"
    for i in range(200, 250):
        with open(d / f"a{i:04d}", "ab") as f:  # copy-ups
            f.write(b"+")
    for i in range(300, 310):
        os.rename(d / f"a{i:04d}", d / f"r{i:04d}")
    os.link(d / "b0000", d / "h0000")
    for i in range(1, 11):
        os.unlink(d / f"b{i:04d}")
    for i in range(100):
        (d / f"n{i:04d}").write_bytes(b"n")
    (d / "newdir").mkdir()
    (d / "m05" / "below").unlink()
    os.rmdir(d / "m05")
    (d / "m05").mkdir()  # opaque now
    with open(d / "a0500", "ab") as f:  # one name of the lower hard link
        f.write(b"+")


def _kind(is_dir: bool, is_link: bool, is_file: bool) -> str:
    """The type letter both views can tell (d_type says no more for the rest)."""
    return "d" if is_dir else "l" if is_link else "f" if is_file else "o"


def _listing(m: Path) -> dict[str, tuple[int, str]]:
    """name -> (d_ino, type) as readdir gives them."""
    with os.scandir(m / "d") as it:
        entries = list(it)
    return {e.name: (e.inode(), _kind(e.is_dir(follow_symlinks=False), e.is_symlink(),
                                      e.is_file(follow_symlinks=False))) for e in entries}


def _lstat_view(m: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    """name -> (st_ino, type) as lstat gives them."""
    out = {}
    for name in names:
        st = os.lstat(m / "d" / name)
        out[name] = (st.st_ino, _kind(stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode),
                                      stat.S_ISREG(st.st_mode)))
    return out


def test_plain_entries_carry_what_lstat_reports(tmp_path: Path) -> None:
    ours, kern = make_layers(tmp_path / "ours"), make_layers(tmp_path / "kernel")
    _build(ours)
    _build(kern)
    with kernel_overlay(kern.lowers, kern.upper, kern.work, kern.mnt) as km:
        _change(km)
        want_names = sorted(os.listdir(km / "d"))
    with overlayfuse_mount(ours.lowers, ours.upper, ours.work, ours.mnt):
        _change(ours.mnt)
    # a fresh daemon and a fresh kernel inode cache: the listing is the first use of the dir
    with overlayfuse_mount(ours.lowers, ours.upper, ours.work, ours.mnt,
                           extra=["debug", "readdirplus_auto"]) as dm:
        listed = _listing(ours.mnt)
        log = dm.stderr()
        assert sorted(listed) == want_names
        assert listed == _lstat_view(ours.mnt, sorted(listed))
        # and a second listing, read from the kernel's cached copy or asked again, agrees
        assert _listing(ours.mnt) == listed
    assert "opcode: READDIRPLUS" in log, "the first chunk carries attributes"
    assert "opcode: READDIR (" in log, "the rest of the big listing was plain READDIR"


def test_without_the_option_every_chunk_carries_attributes(tmp_path: Path) -> None:
    """The default: a listing followed by a stat of each entry (find, ls -l, du) finds every
    entry looked up already, whatever the directory's size."""
    layers = make_layers(tmp_path)
    _build(layers)
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt,
                           extra=["debug"]) as dm:
        listed = _listing(layers.mnt)
        log = dm.stderr()
        assert len(listed) == 2 * N - 50 + 20 * 3 + 1
    assert "opcode: READDIRPLUS" in log
    assert "opcode: READDIR (" not in log
