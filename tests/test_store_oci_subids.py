"""A normal user's store and images: owners travel as the IDs its runs see.

The user's layers hold files owned by subordinate IDs (inside ID N is the N-th one); an
exported layer must say N, not the host's ID, and an import must give the files back to the
subordinate IDs (to a root store: to N itself).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import busybox_tree
from oci_helpers import cli, ok
from test_store_root import Who
from unpriv import Unprivileged, subordinate_ids

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo"),
              pytest.mark.usefixtures("private_probe_cache")]

SUB_START, SUB_COUNT = 760000, 65536  # apart from the other tests' ranges
WRITE = ("mkdir -p /w/a/deep && touch /w/a/one /w/a/deep/f && chown 1:1 /w/a/one && "
         "chown -R 1000:1000 /w/a/deep && mkfifo /w/a/fifo && chown 2:3 /w/a/fifo && "
         "rm /bin/mkfifo")
# inside IDs of what WRITE makes
INSIDE = {"w/a": (0, 0), "w/a/one": (1, 1), "w/a/deep": (1000, 1000),
          "w/a/deep/f": (1000, 1000), "w/a/fifo": (2, 3)}


@pytest.fixture
def user(unprivileged: Unprivileged) -> Iterator[Who]:
    with subordinate_ids(unprivileged.user, SUB_START, SUB_COUNT):
        yield Who(unprivileged, unprivileged.home)


def top_layer_owners(layout: Path) -> dict[str, tuple[int, int]]:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    with tarfile.open(blobs / manifest["layers"][-1]["digest"][7:]) as tf:
        return {m.name: (m.uid, m.gid) for m in tf if m.name in INSIDE}


def owners_in(base: Path) -> dict[str, tuple[int, int]]:
    """Owners on disk of WRITE's entries, in whichever layer holds them."""
    out = {}
    for layer in (base / "layers").iterdir():
        for rel in INSIDE:
            p = layer / rel
            if os.path.lexists(p):
                st = p.lstat()
                out[rel] = (st.st_uid, st.st_gid)
    return out


def test_owners_travel_as_the_ids_runs_see(user: Who, tmp_path: Path) -> None:
    u = user.user
    assert u is not None
    src = user.own(busybox_tree(user.home / f"src-{uuid.uuid4().hex[:6]}",
                                ("sh", "mkdir", "touch", "chown", "mkfifo"),
                                dirs=("bin", "etc", "root", "tmp", "w")))
    ok(user.store("init", "--from", str(src)))
    ok(user.store("run", "--", "sh", "-c", WRITE))
    ok(user.store("snapshot", "s"))
    sub = SUB_START - 1  # inside ID N is SUB_START + N - 1 on the host
    host = {rel: (u.uid, u.gid) if i == (0, 0) else (sub + i[0], sub + i[1])
            for rel, i in INSIDE.items()}
    assert owners_in(user.base) == host
    layout = user.home / f"layout-{uuid.uuid4().hex[:6]}"
    ok(user.store("export", "--snapshot", "s", f"oci:{layout}:s"))
    assert top_layer_owners(layout) == INSIDE
    # into another store of the user: the subordinate IDs again
    other = Who(u, user.home / f"other-{uuid.uuid4().hex[:6]}")
    other.home.mkdir()
    user.own(other.home)
    ok(other.store("init", "--from-image", f"oci:{layout}:s"))
    assert owners_in(other.base) == host
    # the run's whiteout, made again as root of the user's namespace
    assert [d for d in (other.base / "layers").iterdir()
            if os.path.lexists(d / "bin/mkfifo") and
            stat.S_ISCHR((d / "bin/mkfifo").lstat().st_mode) and
            (d / "bin/mkfifo").lstat().st_rdev == 0]
    # into root's store: the IDs themselves
    root_base = tmp_path / "root-store"
    ok(cli(root_base, "init", "--from-image", f"oci:{layout}:s"))
    assert owners_in(root_base) == INSIDE
