"""Shared parts of tests/test_store_oci*.py: the CLI, a real registry, hand-made OCI layouts,
and views of a store's layer chains through the kernel's overlayfs (the oracle)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from mounts import REPO, kernel_overlay, tree_snapshot


def cli(base: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayfuse", "store", "--base", str(base),
                           *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """A refused command: non-zero, and exactly one line on stderr."""
    assert r.returncode != 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlayfuse: "), r.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_line(user: str, password: str) -> str:
    """An htpasswd line (bcrypt, the only hash the registry takes), from libcrypt."""
    code = ("import crypt, sys; print(crypt.crypt(sys.argv[1], "
            "crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))")  # cost 4: quick checks
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, password],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("$2"), out
    return f"{user}:{out}\n"


@contextlib.contextmanager
def registry(workdir: Path, auth: tuple[str, str] | None = None) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 with its storage in ``workdir`` (and basic auth
    for ``auth``'s user and password); stopped by PID."""
    port = free_port()
    cfg = workdir / "config.yml"
    text = ("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
    if auth is not None:
        (workdir / "htpasswd").write_text(bcrypt_line(*auth))
        text += f"auth:\n  htpasswd:\n    realm: ovf\n    path: {workdir / 'htpasswd'}\n"
    cfg.write_text(text)
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError("docker-registry exited: "
                                     + (workdir / "registry.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as e:
                if e.code == 401 and auth is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("docker-registry did not answer within 30 s")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


SKELETON = ("oci", "oci/lock", "oci/blobs", "oci/blobs/sha256")


def store_state(base: Path) -> tuple[list[str], list[str]]:
    """What a refused command must not change: every path under the base (the catalog's
    own files aside) and the catalog's rows."""
    paths = []
    for d, dirs, files in os.walk(base):
        for n in dirs + files:
            rel = os.path.relpath(os.path.join(d, n), base)
            # the blob cache's empty skeleton is made by the first export or import
            if not rel.startswith("store.db") and rel not in SKELETON:
                paths.append(rel)
    conn = sqlite3.connect(base / "store.db")
    try:
        rows = [line for line in conn.iterdump() if line.startswith("INSERT")]
    finally:
        conn.close()
    return sorted(paths), rows


def chain_dirs(base: Path, config: str, ref: str) -> list[Path]:
    """The layer dirs of ``config``'s ``ref``, topmost first."""
    conn = sqlite3.connect(base / "store.db")
    try:
        (layer,) = conn.execute("SELECT layer FROM refs WHERE config=? AND name=?",
                                (config, ref)).fetchone()
        out = []
        while layer is not None:
            out.append(base / "layers" / layer)
            (layer,) = conn.execute("SELECT parent FROM layers WHERE id=?",
                                    (layer,)).fetchone()
        return out
    finally:
        conn.close()


def view(root: Path, hide: tuple[str, ...] = ()) -> dict[str, Any]:
    """A merged tree as a user sees it: entries (owners included), ns mtimes, hard-link
    groups; xattrs named in ``hide`` left out."""
    prefixes = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.",
                "trusted.fuseoverlayfs.") + hide
    snap = tree_snapshot(root, owner=True, hide_xattrs=prefixes)
    mtimes, inodes = {}, {}
    for rel in snap:
        st = os.lstat(root / rel)
        mtimes[rel] = st.st_mtime_ns
        if not os.path.isdir(root / rel):
            inodes.setdefault(st.st_ino, []).append(rel)
    return {"entries": snap, "mtimes": mtimes,
            "links": sorted(sorted(v) for v in inodes.values() if len(v) > 1)}


@contextlib.contextmanager
def chain_view(lowers: list[Path], mnt: Path, opts: str = "redirect_dir=on,metacopy=on"
               ) -> Iterator[Path]:
    """The kernel's read-only merge of ``lowers`` (topmost first)."""
    mnt.mkdir(exist_ok=True)
    with kernel_overlay(lowers, None, None, mnt, opts) as m:
        yield m


# -- hand-made images ---------------------------------------------------------------------

def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None,
          **attrs: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.mtime = 1_700_000_000
    for k, v in attrs.items():
        setattr(ti, k, v)
    if kind != tarfile.REGTYPE:
        return ti, None
    return ti, data if data is not None else b""


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest, len(data)


def make_layout(layout: Path, layers: list[bytes], tag: str = "t", *,
                media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip",
                diff_ids: list[str] | None = None) -> str:
    """An OCI layout holding one image of these layer tars (gzipped as the media type says);
    ``diff_ids`` replaces the true ones (a lying config).  Returns ``oci:DIR:TAG``."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs = []
    for data in layers:
        blob = gzip.compress(data, mtime=0) if media_type.endswith("gzip") else data
        digest, size = _blob(layout, blob)
        descs.append({"mediaType": media_type, "digest": digest, "size": size})
    true_ids = ["sha256:" + hashlib.sha256(d).hexdigest() for d in layers]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids or true_ids}}
    cdigest, csize = _blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdigest, "size": csize}, "layers": descs}
    mdigest, msize = _blob(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
         "size": msize, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return f"oci:{layout}:{tag}"
