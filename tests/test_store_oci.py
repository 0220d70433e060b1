"""``store export`` and ``store init --from-image``: layers out as OCI images and back, exactly.

Fixtures are written by the kernel's overlayfs (redirect_dir, metacopy and index on) and by
the FUSE backend: whiteouts, an opaque dir, a renamed dir, hard links, binary xattrs, a file
capability, a fifo, a device, a setuid file with other owners, a non-UTF-8 name.  They go
through a real registry (Debian's docker-registry on 127.0.0.1, via skopeo), an OCI layout
and an OCI archive into a fresh store; the kernel's merge of both chains must be equal.
Hand-made layouts check the import's rules and refusals.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mounts import diff_trees, force_unmount, kernel_overlay
from oci_helpers import (chain_dirs, chain_view, cli, entry, make_layout, ok, one_line_error,
                         registry, store_state, tar_bytes, view)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlay fixtures need root"),
    pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("docker-registry") is None,
                       reason="needs skopeo and docker-registry (tools/setup.sh installs them)"),
]

NON_UTF8 = os.fsdecode(b"caf\xe9")
CAP = "cap_net_raw=ep"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with registry(tmp_path_factory.mktemp("registry")) as host:
        yield host


def make_lower(root: Path) -> Path:
    """The tree the config starts from."""
    for d in ("etc", "opq/sub", "olddir/sub", "meta", "twice/a", "bin", "run", "dev"):
        (root / d).mkdir(parents=True)
    (root / "etc/gone").write_text("gone\n")
    (root / "etc/keep").write_text("keep\n")
    (root / "opq/a").write_text("a\n")
    (root / "opq/sub/b").write_text("b\n")
    (root / "olddir/x").write_text("x\n")
    (root / "olddir/sub/y").write_text("y\n")
    (root / "lowerfile").write_text("shared\n")
    (root / "hl1").write_text("one inode\n")
    os.link(root / "hl1", root / "hl2")  # hl1 changes above: its link stays below
    (root / "meta/file").write_bytes(os.urandom(100_000))
    (root / "twice/a/z").write_text("z\n")
    os.setxattr(root / "olddir/x", "user.moved", b"\x01\x02")
    return root


def first_round(m: Path) -> None:
    """Everything an OCI layer can carry, done through the mount."""
    os.unlink(m / "etc/gone")
    shutil.rmtree(m / "opq")
    (m / "opq").mkdir()
    (m / "opq/new").write_text("new\n")
    os.rename(m / "olddir", m / "newdir")
    (m / "newdir/added").write_text("added\n")
    (m / "links").mkdir()
    (m / "links/a").write_text("linked\n")
    os.link(m / "links/a", m / "links/b")
    os.link(m / "lowerfile", m / "lowerlink")
    with open(m / "hl1", "a") as f:
        f.write("changed\n")
    (m / "bin/su").write_text("setuid\n")
    os.chown(m / "bin/su", 1000, 1000)
    os.chmod(m / "bin/su", 0o4755)
    (m / "bin/ping").write_text("capable\n")
    subprocess.run(["setcap", CAP, str(m / "bin/ping")], check=True)
    (m / "data").write_bytes(b"data\n")  # gone again in the second round
    os.setxattr(m / "opq/new", "user.bin", b"\x00\xff\x01binary\x80")
    os.setxattr(m / "opq/new", "trusted.secret", b"never exported")
    os.mkfifo(m / "run/fifo")
    os.chown(m / "run/fifo", 5, 6)
    (m / NON_UTF8).write_text("latin-1 name\n")
    os.mknod(m / "dev/null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(m / "meta/file", 0o600)  # metacopy where the kernel may
    (m / "home/alice").mkdir(parents=True)
    os.chown(m / "home/alice", 1000, 1000)
    os.chmod(m / "home/alice", 0o750)
    os.symlink("../etc/keep", m / "lnk")
    os.lchown(m / "lnk", 7, 8)


def second_round(m: Path) -> None:
    os.unlink(m / "data")
    with open(m / "etc/keep", "a") as f:
        f.write("more\n")
    os.rename(m / "twice/a", m / "twice/c")
    shutil.rmtree(m / "newdir/sub")


def kernel_rounds(base: Path, mnt: Path) -> None:
    """Both rounds on the kernel's overlay with redirect_dir, index and metacopy on, over the
    store's own upper (taken the way the store's mounts take it)."""
    from overlayfuse.store.api import LayerStore
    from overlayfuse.store.use import take
    store = LayerStore(str(base))
    for n, work in enumerate((first_round, second_round), 1):
        use = take(store, "default", mode="upper")
        try:
            spec = use.spec
            with kernel_overlay(list(spec.lowerdirs), spec.upperdir, spec.workdir, mnt,
                                "redirect_dir=on,index=on,metacopy=on"):
                work(mnt)
        finally:
            use.release()
        ok(cli(base, "snapshot", f"s{n}"))
    store.close()


def fuse_rounds(base: Path, mnt: Path) -> None:
    for n, work in enumerate((first_round, second_round), 1):
        ok(cli(base, "mount", "--backend", "fuse", str(mnt)))
        try:
            work(mnt)
        finally:
            ok(cli(base, "umount", str(mnt)))
        ok(cli(base, "snapshot", f"s{n}"))


@pytest.fixture(scope="module", params=["kernel", "fuse"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """A store whose snapshot s2 was written by ``param``, and the kernel's view of it."""
    tmp = tmp_path_factory.mktemp(f"src-{request.param}")
    base, mnt = tmp / "base", tmp / "mnt"
    mnt.mkdir()
    ok(cli(base, "init", "--from", str(make_lower(tmp / "lower"))))
    try:
        (kernel_rounds if request.param == "kernel" else fuse_rounds)(base, mnt)
    finally:
        force_unmount(mnt)
    with chain_view(chain_dirs(base, "default", "s2"), tmp / "view") as v:
        full = view(v)
        expected = view(v, hide=("trusted.",))
    # the fixture holds what the test is about
    names = full["entries"]
    assert ("trusted.secret", b"never exported") in names["opq/new"][4]
    assert ("user.bin", b"\x00\xff\x01binary\x80") in names["opq/new"][4]
    assert "etc/gone" not in names and "opq/a" not in names and "newdir/x" in names
    assert "olddir" not in names and "twice/c/z" in names and "newdir/sub" not in names
    assert names["bin/su"][1] == 0o4755 and names["bin/su"][5:] == (1000, 1000)
    assert ["links/a", "links/b"] in full["links"]
    assert ["lowerfile", "lowerlink"] in full["links"]
    assert names[NON_UTF8][0] == "f" and names["dev/null2"][0] == "c"
    assert any(x[0] == "security.capability" for x in names["bin/ping"][4])
    yield request.param, base, expected


def layer_has(base: Path, config: str, ref: str, check: str) -> bool:
    """Whether the top layer of ``ref`` holds a redirect or metacopy mark (what the export
    has to resolve)."""
    top = chain_dirs(base, config, ref)
    for layer in top:
        for d, dirs, files in os.walk(layer):
            for n in dirs + files:
                try:
                    names = os.listxattr(os.path.join(d, n), follow_symlinks=False)
                except OSError:
                    continue
                if any(x.endswith("overlay." + check) for x in names):
                    return True
    return False


def imported_view(base: Path, config: str, mnt: Path) -> dict[str, Any]:
    """The imported config as ``store mount --snapshot postinit`` shows it."""
    mnt.mkdir(exist_ok=True)
    ok(cli(base, "--config", config, "mount", "--backend", "kernel", "--snapshot", "postinit",
           str(mnt)))
    try:
        return view(mnt)
    finally:
        ok(cli(base, "umount", str(mnt)))


def test_round_trip_through_a_registry(source: tuple[str, Path, dict[str, Any]], reg: str,
                                       tmp_path: Path) -> None:
    backend, base, expected = source
    assert layer_has(base, "default", "s2", "redirect")
    if backend == "kernel":
        assert layer_has(base, "default", "s2", "metacopy")
    ref = f"docker://{reg}/ovf/{backend}:v1"
    t0 = time.monotonic()
    r = ok(cli(base, "export", "--snapshot", "s2", "--tls-verify=false", ref))
    push = time.monotonic() - t0
    assert "3 layers" in r.stderr and "(3 converted, 0 reused)" in r.stderr, r.stderr
    t0 = time.monotonic()
    r = ok(cli(base, "export", "--snapshot", "s2", "--tls-verify=false", ref))
    again = time.monotonic() - t0
    assert "(0 converted, 3 reused)" in r.stderr, r.stderr
    base2 = tmp_path / "base2"
    t0 = time.monotonic()
    r = ok(cli(base2, "init", "--from-image", ref, "--tls-verify=false"))
    pull = time.monotonic() - t0
    assert "(3 converted, 0 reused)" in r.stderr, r.stderr
    got = imported_view(base2, "default", tmp_path / "mnt")
    assert diff_trees(expected["entries"], got["entries"]) == []
    assert expected["mtimes"] == got["mtimes"]
    assert expected["links"] == got["links"]
    # the same image again: every layer shared by chain ID, none copied
    layers = sorted(os.listdir(base2 / "layers"))
    r = ok(cli(base2, "--config", "again", "init", "--from-image", ref, "--tls-verify=false"))
    assert "(0 converted, 3 reused)" in r.stderr, r.stderr
    assert sorted(os.listdir(base2 / "layers")) == layers
    print(f"\n{backend}: push {push:.2f} s, unchanged export {again:.2f} s, pull {pull:.2f} s")


def test_round_trip_through_layout_and_archive(source: tuple[str, Path, dict[str, Any]],
                                               tmp_path: Path) -> None:
    _backend, base, expected = source
    for n, dest in enumerate((f"oci:{tmp_path / 'layout'}:v2",
                              f"oci-archive:{tmp_path / 'image.tar'}:v2")):
        ok(cli(base, "export", "--snapshot", "s2", dest))
        if n == 0:
            assert exported_xattr_names(tmp_path / "layout") == {
                "SCHILY.xattr.user.bin", "SCHILY.xattr.user.moved",
                "SCHILY.xattr.security.capability"}
        base2 = tmp_path / f"base{n}"
        ok(cli(base2, "init", "--from-image", dest))
        got = imported_view(base2, "default", tmp_path / "mnt")
        assert diff_trees(expected["entries"], got["entries"]) == []
        assert (expected["mtimes"], expected["links"]) == (got["mtimes"], got["links"])


def exported_xattr_names(layout: Path) -> set[str]:
    """The xattr records in every layer blob of a layout (overlay marks and trusted.* must
    never be among them)."""
    out = set()
    for blob in (layout / "blobs" / "sha256").iterdir():
        if blob.read_bytes()[:2] != b"\x1f\x8b":
            continue
        with tarfile.open(blob) as tf:
            for m in tf:
                out |= {k for k in m.pax_headers if k.startswith("SCHILY.xattr.")}
    return out


def test_flat_tar_is_the_merged_tree(source: tuple[str, Path, dict[str, Any]],
                                     tmp_path: Path) -> None:
    """``export --tar``: GNU tar unpacks exactly the kernel's merged view."""
    _backend, base, expected = source
    out = tmp_path / "flat.tar"
    ok(cli(base, "export", "--snapshot", "s2", "--tar", str(out)))
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert not [n for n in names if os.path.basename(n).startswith(".wh.")]
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(out), "-C", str(root)], check=True, capture_output=True)
    got = view(root)
    assert diff_trees(expected["entries"], got["entries"]) == []
    assert (expected["mtimes"], expected["links"]) == (got["mtimes"], got["links"])


# -- the import's rules, on hand-made images ----------------------------------------------

def test_whiteouts_opaque_dirs_and_xattrs_on_import(tmp_path: Path) -> None:
    lower = tar_bytes([entry("d", tarfile.DIRTYPE), entry("d/old", data=b"old"),
                       entry("e", tarfile.DIRTYPE), entry("e/keep", data=b"k"),
                       entry("f", data=b"f"), entry("g", data=b"g"),
                       entry("k", tarfile.DIRTYPE), entry("k/old", data=b"old")])
    x_ti, _ = entry("x", data=b"x")
    x_ti.pax_headers = {"SCHILY.xattr.user.ok": "1", "SCHILY.xattr.trusted.bad": "t",
                        "SCHILY.xattr.user.overlay.opaque": "y",
                        "SCHILY.xattr.security.selinux": "system_u:object_r:etc_t:s0"}
    upper = tar_bytes([entry(".wh.d"), entry("d", tarfile.DIRTYPE), entry("d/new", data=b"n"),
                       entry("e/.wh..wh..opq"), entry("e/n", data=b"n"), entry(".wh.f"),
                       (x_ti, b"x"), entry("z", tarfile.CHRTYPE, devmajor=0, devminor=0),
                       entry("g", data=b"g2"), entry(".wh.k"), entry("k/new", data=b"n")])
    src = make_layout(tmp_path / "img", [lower, upper])
    base = tmp_path / "base"
    r = ok(cli(base, "init", "--from-image", src))
    assert "skipped 1 device nodes" in r.stderr and "dropped 3 xattrs" in r.stderr, r.stderr
    with chain_view(chain_dirs(base, "default", "postinit"), tmp_path / "v") as v:
        assert sorted(os.listdir(v)) == ["d", "e", "g", "k", "x"]
        assert os.listdir(v / "d") == ["new"] and os.listdir(v / "e") == ["n"]
        assert os.listdir(v / "k") == ["new"]  # .wh.k and k/new: an opaque k
        assert (v / "g").read_bytes() == b"g2"
        assert os.listxattr(v / "x") == ["user.ok"]


def _refused(tmp_path: Path, layers: list[bytes], why: str, **kw: Any) -> str:
    """Import an image into a store that has a config already: one line, nothing changed."""
    base = tmp_path / "base"
    if not base.exists():
        keep = tmp_path / "keep"
        keep.mkdir()
        (keep / "f").write_text("f\n")
        ok(cli(base, "--config", "keep", "init", "--from", str(keep)))
    before = store_state(base)
    name = f"img{len(list(tmp_path.glob('img*')))}"
    src = make_layout(tmp_path / name, layers, **kw)
    line = one_line_error(cli(base, "init", "--from-image", src))
    assert why in line, line
    assert store_state(base) == before
    return line


def test_entries_that_leave_the_tree_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sym, _ = entry("l", tarfile.SYMTYPE, linkname=str(outside))
    hard, _ = entry("h", tarfile.LNKTYPE, linkname="../outside/x")
    cases = [
        ([entry("../evil", data=b"e")], "names '..'"),
        ([entry("/abs", data=b"a")], "absolute path"),
        ([(sym, None), entry("l/x", data=b"x")], "which is not a directory"),
        ([entry("a", data=b"a"), (hard, None)], "names '..'"),
        ([(entry("h2", tarfile.LNKTYPE, linkname="later")[0], None), entry("later")],
         "not an earlier file"),
    ]
    for layer, why in cases:
        _refused(tmp_path, [tar_bytes(layer)], why)
    assert os.listdir(outside) == []


def test_lying_digests_and_foreign_media_types_are_refused(tmp_path: Path) -> None:
    good = tar_bytes([entry("a", data=b"a")])
    _refused(tmp_path, [good], "does not match the diff ID",
             diff_ids=["sha256:" + "0" * 64])
    _refused(tmp_path, [good], "media type application/vnd.example.foreign",
             media_type="application/vnd.example.foreign")
    # a blob whose bytes are not what its name says: skopeo's or our check, one line
    src = make_layout(tmp_path / "corrupt", [good])
    blob = next(p for p in (tmp_path / "corrupt/blobs/sha256").iterdir()
                if p.read_bytes()[:2] == b"\x1f\x8b")
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    before = store_state(tmp_path / "base")
    line = one_line_error(cli(tmp_path / "base", "init", "--from-image", src))
    assert "digest" in line.lower() or "checksum" in line.lower(), line
    assert store_state(tmp_path / "base") == before


def test_registry_failures_are_one_line(reg: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    (tmp_path / "keep").mkdir()
    ok(cli(base, "--config", "keep", "init", "--from", str(tmp_path / "keep")))
    before = store_state(base)
    for src, why in ((f"docker://{reg}/ovf/none:nope", "manifest unknown"),
                     (f"docker://127.0.0.1:{_closed_port()}/ovf/x:v1", "connection refused"),
                     ("docker.io/library/busybox", "name a transport")):
        line = one_line_error(cli(base, "init", "--from-image", src, "--tls-verify=false"))
        assert why in line.lower(), line
        assert store_state(base) == before
    line = one_line_error(cli(base, "--config", "keep", "export", "--tls-verify=false",
                              f"docker://127.0.0.1:{_closed_port()}/ovf/x:v1"))
    assert "connection refused" in line, line


def test_authfile(tmp_path: Path) -> None:
    """A registry that wants a login: refused without credentials, one line; with
    ``--authfile`` (podman's format) both ways work."""
    import base64
    import json
    (tmp_path / "reg").mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    base = tmp_path / "base"
    ok(cli(base, "init", "--from", str(src)))
    with registry(tmp_path / "reg", auth=("ovf", "s3cret")) as host:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {host: {
            "auth": base64.b64encode(b"ovf:s3cret").decode()}}}))
        ref = f"docker://{host}/ovf/private:v1"
        env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))  # no default auth file
        line = one_line_error(cli(base, "export", "--tls-verify=false", ref, env=env))
        assert "unauthorized" in line.lower() or "authentication required" in line, line
        ok(cli(base, "export", "--tls-verify=false", "--authfile", str(auth), ref, env=env))
        base2 = tmp_path / "base2"
        line = one_line_error(cli(base2, "init", "--from-image", ref, "--tls-verify=false",
                                  env=env))
        assert "unauthorized" in line.lower() or "authentication required" in line, line
        ok(cli(base2, "init", "--from-image", ref, "--tls-verify=false", "--authfile",
               str(auth), env=env))
        assert (base2 / "layers").exists() and len(os.listdir(base2 / "layers")) == 1


def _closed_port() -> int:
    from oci_helpers import free_port
    return free_port()


def test_catalog_rows_follow_the_layers(tmp_path: Path) -> None:
    """A converted layer is remembered; when it goes, its row and blob go at the next use."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    base = tmp_path / "base"
    ok(cli(base, "init", "--from", str(src)))
    ok(cli(base, "export", f"oci:{tmp_path / 'out'}:a"))
    conn = sqlite3.connect(base / "store.db")
    try:
        (digest,) = conn.execute("SELECT digest FROM oci_layers").fetchone()
    finally:
        conn.close()
    assert (base / "oci/blobs/sha256" / digest[7:]).exists()
    ok(cli(base, "scrub"))
    ok(cli(base, "--config", "other", "init"))
    ok(cli(base, "--config", "other", "export", f"oci:{tmp_path / 'out'}:b"))
    conn = sqlite3.connect(base / "store.db")
    try:
        rows = conn.execute("SELECT digest FROM oci_layers").fetchall()
    finally:
        conn.close()
    assert (digest,) not in rows and len(rows) == 1
    assert not (base / "oci/blobs/sha256" / digest[7:]).exists()
    # and `gc` does it too, with no export or import after
    ok(cli(base, "--config", "other", "scrub"))
    assert os.listdir(base / "oci/blobs/sha256") != []
    ok(cli(base, "gc"))
    assert os.listdir(base / "oci/blobs/sha256") == []


def test_layer_push_and_pull_for_a_build_cache(reg: str, tmp_path: Path) -> None:
    """The calls a build cache makes: a layer with its chain under a tag, a cheap miss for a
    tag that is not there, a hit held by the caller's own rows."""
    from overlayfuse.store import catalog as cat
    from overlayfuse.store.api import LayerStore
    from overlayfuse.store.image import Access, pull_layer, push_layer
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    a, mnt = tmp_path / "a", tmp_path / "mnt"
    mnt.mkdir()
    ok(cli(a, "init", "--from", str(src)))
    ok(cli(a, "mount", str(mnt)))
    try:
        (mnt / "g").write_text("g\n")
        os.unlink(mnt / "f")
    finally:
        ok(cli(a, "umount", str(mnt)))
    ok(cli(a, "snapshot", "s1"))
    store_a = LayerStore(str(a))
    layer = store_a.config("default").refs()["s1"]
    access = Access(tls_verify=False)
    ref = f"docker://{reg}/ovf/cache"
    push_layer(store_a, layer, ref, "k1", access)
    store_b = LayerStore(str(tmp_path / "b"))
    store_b.db(create=True)

    def hold(conn: sqlite3.Connection, top: str) -> None:
        conn.execute("INSERT INTO configs(name, origin, created) VALUES ('c', 'cache', 0)")
        for name in (cat.BASE, cat.CURRENT, cat.UPPER, "s1"):
            cat.set_ref(conn, "c", name, top)
    t0 = time.monotonic()
    assert pull_layer(store_b, ref, "k0", hold, access) is None
    miss = time.monotonic() - t0
    assert os.listdir(tmp_path / "b" / "layers") == []
    top = pull_layer(store_b, ref, "k1", hold, access)
    assert top is not None and len(chain_dirs(tmp_path / "b", "c", "s1")) == 2
    with chain_view(chain_dirs(a, "default", "s1"), tmp_path / "va") as va:
        want = view(va)
    with chain_view(chain_dirs(tmp_path / "b", "c", "s1"), tmp_path / "vb") as vb:
        assert view(vb) == want and os.listdir(vb) == ["g"]
    store_a.close()
    store_b.close()
    print(f"\ncache miss lookup {miss:.3f} s")
