"""Configs out as OCI images and images in as layers; each layer converted once.

A store layer is one OCI layer.  Its conversion (digest, diff ID, size, media type, and the
chain ID of it and its lowers) is remembered in the table ``oci_layers`` of the catalog, and
its gzipped blob kept in ``BASE/oci/blobs/sha256/`` (the blob dir skopeo shares with the
store): exporting an unchanged layer again costs a lookup, and pushing it again costs skopeo
a HEAD request.  A live upper (unsaved changes) is converted every time and not remembered.
Importing takes the image's layers bottom up; one whose chain ID (the diff IDs of it and all
below) the store has already is shared, the others are unpacked into ``tmp/`` with digests
checked, and all of them reach the catalog in one transaction with whatever holds the top
(a config, a build step): a failure anywhere leaves the store as it was.  The table is ours
alone: rows of layers that are gone, and blobs no row names, are pruned under ``BASE/oci/lock``
before and after each export or import.

For a build cache: :func:`push_layer` stores a layer (with its chain) under a tag, and
:func:`pull_layer` asks cheaply whether a tag is there (:func:`image_exists`) and takes it
(:func:`import_image`), held by whatever the caller records in the same transaction.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import OverlayfuseError
from ..sandbox import plan_ids, run_as_mapped_root
from . import catalog as cat
from . import skopeo
from .disk import TmpEntry, as_owner, make_layer_root
from .locks import lock_all
from .ociapply import LAYER_TYPES, apply_blob
from .ocitar import flat_tar, layer_blob
from .progress import Progress
from .skopeo import Access
from .store import LayerStore
from .use import take

log = logging.getLogger(__name__)

TABLE = """
CREATE TABLE IF NOT EXISTS oci_layers (
    layer TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    chain_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS oci_layers_chain ON oci_layers(chain_id);
"""
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
LOCAL_TAG = "image"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
          "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class LayerBlob:
    """One converted layer: what a manifest and a config say of it."""

    digest: str
    diff_id: str
    size: int
    media_type: str
    chain_id: str


@dataclass
class Transfer:
    """What an export or import did, for its summary line."""

    layers: int = 0
    converted: int = 0          # exported: tarred now; imported: unpacked now
    reused: int = 0             # exported: from the table; imported: shared by chain ID
    digest: str = ""            # the manifest's
    top: str = ""               # imported: the top layer
    notes: list[str] = field(default_factory=list)

    def line(self, verb: str, where: str) -> str:
        return (f"{verb} {self.layers} layer{'s' * (self.layers != 1)} {where} "
                f"({self.converted} converted, {self.reused} reused), {self.digest}")


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI's ChainID: a layer's diff ID with all of those below it."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef"
                                                     for c in hexpart):
        raise OverlayfuseError(f"unsupported or malformed digest {digest!r}")
    return hexpart


class BlobDir:
    """``BASE/oci``: the blobs the store keeps, the lock that guards them and the table."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.top = os.path.join(store.base, "oci")
        self.path = os.path.join(self.top, "blobs")
        self.sha = os.path.join(self.path, "sha256")

    def blob(self, digest: str) -> str:
        return os.path.join(self.sha, _hex(digest))

    def _give(self, path: str) -> None:
        """Root working on a user's store leaves the user's files."""
        if os.geteuid() == 0 and self.store.owner[0] != 0:
            os.chown(path, *self.store.owner)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The blobs and the table to ourselves (another export or import waits)."""
        for d in (self.top, self.path, self.sha):
            try:
                os.mkdir(d, 0o755)
                self._give(d)
            except FileExistsError:
                pass
        fd = os.open(os.path.join(self.top, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            conn = self.store.db()
            for statement in TABLE.split(";"):
                if statement.strip():
                    conn.execute(statement)
            with self.store.txn() as conn:
                self._prune(conn)
            try:
                yield
            finally:
                # what a failed import fetched, and the small blobs of the last image
                with self.store.txn() as conn:
                    self._prune(conn)
        finally:
            os.close(fd)

    def _prune(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM oci_layers WHERE layer NOT IN (SELECT id FROM layers)")
        keep = {_hex(d) for (d,) in conn.execute("SELECT digest FROM oci_layers")}
        for name in os.listdir(self.sha):
            if name not in keep:
                try:
                    os.unlink(os.path.join(self.sha, name))
                except FileNotFoundError:
                    pass

    def put_json(self, obj: object) -> tuple[str, int]:
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob(digest)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        self._give(path + ".tmp")
        os.replace(path + ".tmp", path)
        return digest, len(data)

    def read_json(self, digest: str, what: str) -> dict[str, object]:
        """A small blob, its digest checked."""
        try:
            with open(self.blob(digest), "rb") as f:
                data = f.read(1 << 22)
        except OSError as e:
            raise OverlayfuseError(f"the image's {what} {digest} is missing: {e.strerror}"
                                   ) from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise OverlayfuseError(f"the image's {what} {digest} does not match its digest")
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise OverlayfuseError(f"the image's {what} {digest} is not a JSON object")
        return obj


def prune_blob_cache(store: LayerStore) -> None:
    """``gc``: forget the conversions of layers that are gone and remove their blobs."""
    if os.path.isdir(os.path.join(store.base, "oci")):
        with BlobDir(store).locked():
            pass


def remembered(conn: sqlite3.Connection, layer: str) -> LayerBlob | None:
    row = conn.execute("SELECT digest, diff_id, size, media_type, chain_id FROM oci_layers "
                       "WHERE layer=? AND layer IN (SELECT id FROM layers)",
                       (layer,)).fetchone()
    return LayerBlob(*row) if row else None


def _live_uppers(conn: sqlite3.Connection) -> set[str]:
    """Uppers with unsaved changes: still written, so never remembered."""
    return {u for (u,) in conn.execute(
        "SELECT u.layer FROM refs u JOIN refs c ON u.config=c.config "
        "WHERE u.name=? AND c.name=? AND u.layer<>c.layer", (cat.UPPER, cat.CURRENT))}


# -- out ----------------------------------------------------------------------------------

def export_image(store: LayerStore, config: str, dest: str, *, snapshot: str | None = None,
                 access: Access = Access(), progress: Progress | None = None) -> Transfer:
    """The config's current state (unsaved changes included), or its ``snapshot``, as an
    image at ``dest`` (containers-transports syntax), one OCI layer per store layer."""
    skopeo.check_ref(dest, "export to")
    use = take(store, config, mode="readonly", snapshot=snapshot)
    try:
        return _push(store, list(use.layers), dest, access, progress)
    finally:
        use.release()


def push_layer(store: LayerStore, layer: str, ref: str, tag: str,
               access: Access = Access()) -> Transfer:
    """Store ``layer`` with its chain as the image ``REF:TAG`` (a registry repository
    ``docker://HOST/NAME`` or a layout ``oci:DIR``): a build step's layer under its key."""
    dest = skopeo.check_ref(f"{ref}:{tag}", "push to")
    conn = store.db()
    if layer not in cat.layer_ids(conn):
        raise OverlayfuseError(f"no layer {layer} in the store {store.base}")
    layers = cat.chain(conn, layer)
    locks = lock_all([(store.layout.lock(x), False) for x in layers])
    if locks is None:
        raise OverlayfuseError(f"layer {layer} is being written")
    try:
        return _push(store, layers, dest, access, None)
    finally:
        locks.release()


def _push(store: LayerStore, layers: list[str], dest: str, access: Access,
          progress: Progress | None) -> Transfer:
    """``layers`` (topmost first, taken by the caller) as an image at ``dest``."""
    progress = progress or Progress(f"exporting to {dest}")
    blobs = BlobDir(store)
    result = Transfer(layers=len(layers))
    descs: list[LayerBlob] = []
    with blobs.locked():
        with store.txn() as conn:
            live = _live_uppers(conn)
            known = {x: remembered(conn, x) for x in layers}
        parent: str | None = None
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            blob = known[layer] if layer not in live else None
            if blob is not None and os.path.exists(blobs.blob(blob.digest)):
                result.reused += 1
            else:
                progress.update(f"layer {len(layers) - i}/{len(layers)}", force=True)
                blob = _convert(store, blobs, layers[i:], parent)
                result.converted += 1
                if layer not in live:
                    with store.txn() as conn:
                        conn.execute("INSERT OR REPLACE INTO oci_layers(layer, digest, diff_id,"
                                     " size, media_type, chain_id) VALUES (?, ?, ?, ?, ?, ?)",
                                     (layer, blob.digest, blob.diff_id, blob.size,
                                      blob.media_type, blob.chain_id))
            descs.append(blob)
            parent = blob.chain_id
        created = store.db().execute("SELECT created FROM layers WHERE id=?",
                                     (layers[0],)).fetchone()[0]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        config = {
            "created": stamp, "architecture": GOARCH.get(platform.machine(), platform.machine()),
            "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d.diff_id for d in descs]},
            "history": [{"created": stamp, "created_by": f"overlayfuse store layer {x}"}
                        for x in reversed(layers)],
        }
        cdigest, csize = blobs.put_json(config)
        manifest = {
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": cdigest, "size": csize},
            "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size}
                       for d in descs],
        }
        mdigest, msize = blobs.put_json(manifest)
        result.digest = mdigest
        with TmpEntry(store.layout, "export-" + os.urandom(6).hex()) as tmp:
            lay = os.path.join(tmp.path, "layout")
            os.makedirs(os.path.join(lay, "blobs", "sha256"))
            with open(os.path.join(lay, "oci-layout"), "w") as f:
                json.dump({"imageLayoutVersion": "1.0.0"}, f)
            with open(os.path.join(lay, "index.json"), "w") as f:
                json.dump({"schemaVersion": 2, "manifests": [
                    {"mediaType": MANIFEST_TYPE, "digest": mdigest, "size": msize,
                     "annotations": {REF_NAME: LOCAL_TAG}}]}, f)
            progress.update("copying", force=True)
            try:
                skopeo.copy(f"oci:{lay}:{LOCAL_TAG}", dest, access, src_blobs=blobs.path,
                            what=f"cannot export to {dest}")
            finally:
                progress.done()
    return result


def _convert(store: LayerStore, blobs: BlobDir, chain: list[str],
             parent: str | None) -> LayerBlob:
    """Tar and gzip the top of ``chain`` into the blob dir, as the runs see its owners."""
    roots = [store.layout.layer(x) for x in chain]
    prefix = f"{store.namespace}.overlay.".encode()
    tmp = os.path.join(blobs.sha, f"tmp-{os.urandom(6).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        blobs._give(tmp)
        diff_id, digest, size, _n = run_as_mapped_root(
            lambda: layer_blob(roots, prefix, fd), plan_ids("auto", store.owner))
        os.fsync(fd)
        os.rename(tmp, blobs.blob(digest))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return LayerBlob(digest, diff_id, size, LAYER_TYPE, chain_id(parent, diff_id))


def export_tar(store: LayerStore, config: str, path: str, *,
               snapshot: str | None = None) -> int:
    """The merged tree of the current state (or ``snapshot``) as one plain tarball at
    ``path`` (written beside it, then renamed): how many entries."""
    path = os.path.abspath(path)
    use = take(store, config, mode="readonly", snapshot=snapshot)
    tmp = f"{path}.tmp-{os.urandom(4).hex()}"
    try:
        roots = [store.layout.layer(x) for x in use.layers]
        prefix = f"{store.namespace}.overlay.".encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OverlayfuseError(f"cannot write {path}: {e.strerror}") from None
        try:
            n = run_as_mapped_root(lambda: flat_tar(roots, prefix, fd),
                                   plan_ids("auto", store.owner))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        return n
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        use.release()


# -- in -----------------------------------------------------------------------------------

Hold = Callable[[sqlite3.Connection, str], None]


def image_exists(ref: str, access: Access = Access()) -> bool:
    """One cheap look: is there an image at ``ref`` (a tag of a registry repository or an
    OCI layout)?  A missing tag is False; an unreachable registry raises."""
    return skopeo.exists(ref, access)


def pull_layer(store: LayerStore, ref: str, tag: str, hold: Hold,
               access: Access = Access()) -> str | None:
    """The image ``REF:TAG`` as a layer of this store (with its chain), held by ``hold``;
    None when there is no such tag (one manifest request).  A build step's cache hit."""
    src = f"{ref}:{tag}"
    if not image_exists(src, access):
        return None
    return import_image(store, src, hold, access=access).top


def import_image(store: LayerStore, src: str, hold: Hold, *, access: Access = Access(),
                 progress: Progress | None = None) -> Transfer:
    """Take the image ``src`` into the store as a chain of layers; ``hold(conn, top)`` runs
    in the transaction that records them and must reference the top layer (a config's rows,
    a build step), or nothing would keep them."""
    skopeo.check_ref(src, "image")
    progress = progress or Progress(f"importing {src}")
    store.db(create=True)
    blobs = BlobDir(store)
    layout = store.layout
    result = Transfer()
    with blobs.locked(), TmpEntry(layout, "image-" + os.urandom(6).hex()) as tmp:
        lay = os.path.join(tmp.path, "layout")
        progress.update("fetching", force=True)
        skopeo.copy(src, f"oci:{lay}:{LOCAL_TAG}", access, dest_blobs=blobs.path,
                    what=f"cannot fetch {src}")
        descs, diff_ids, mdigest = _read_image(blobs, lay, src)
        result.digest, result.layers = mdigest, len(descs)
        plan = plan_ids("auto", store.owner)
        prefix = f"{store.namespace}.overlay.".encode()
        made: list[tuple[str, str | None, str, LayerBlob]] = []  # id, parent, dir, blob
        shared: list[str] = []
        parent: str | None = None
        parent_dir: str | None = None
        chain: str | None = None
        for n, (desc, diff_id) in enumerate(zip(descs, diff_ids), 1):
            chain = chain_id(chain, diff_id)
            row = store.db().execute(
                "SELECT layer FROM oci_layers WHERE chain_id=? AND layer IN "
                "(SELECT id FROM layers) ORDER BY layer LIMIT 1", (chain,)).fetchone()
            if row is not None:
                parent, parent_dir = row[0], layout.layer(row[0])
                shared.append(row[0])
                result.reused += 1
                continue
            progress.update(f"layer {n}/{len(descs)}", force=True)
            layer = cat.new_layer_id()
            ldir = os.path.join(tmp.path, layer)
            make_layer_root(ldir, parent_dir, store.owner)
            if parent_dir is None:
                os.chmod(ldir, 0o555)  # containers/storage's root when the tar has no "./"
            digest, media_type, size = desc
            blob_path = blobs.blob(digest)
            try:
                summary = run_as_mapped_root(
                    lambda: apply_blob(blob_path, media_type, digest, diff_id, ldir, prefix,
                                       plan.mode != "single"), plan)
            except OverlayfuseError as e:
                if "digest" in str(e) and os.path.exists(blob_path):
                    os.unlink(blob_path)  # never offer a bad blob again
                raise OverlayfuseError(f"{src}: {e}; nothing imported") from None
            result.notes += summary.notes(f"layer {n}")
            made.append((layer, parent, ldir, LayerBlob(digest, diff_id, size, media_type,
                                                        chain)))
            parent, parent_dir = layer, ldir
            result.converted += 1
        if parent is None:  # an image of no layers: an empty tree
            parent = cat.new_layer_id()
            ldir = os.path.join(tmp.path, parent)
            make_layer_root(ldir, None, store.owner)
            made.append((parent, None, ldir, LayerBlob("", "", 0, "", "")))
        if plan.mode == "single":
            result.notes.append(f"the image's owners are not kept, every entry is uid "
                                f"{store.owner[0]}'s (0 in runs): {plan.note}")
        with store.txn() as conn:
            gone = set(shared) - cat.layer_ids(conn)
            if gone:
                raise OverlayfuseError(f"{src}: layer {sorted(gone)[0]} was removed while "
                                       "importing; try again")
            for layer, lparent, _d, blob in made:
                cat.add_layer(conn, layer, lparent)
                if blob.digest:
                    conn.execute("INSERT INTO oci_layers(layer, digest, diff_id, size, "
                                 "media_type, chain_id) VALUES (?, ?, ?, ?, ?, ?)",
                                 (layer, blob.digest, blob.diff_id, blob.size,
                                  blob.media_type, blob.chain_id))
            hold(conn, parent)
            for layer, _p, ldir, _b in made:
                dest = layout.layer(layer)
                as_owner(lambda: os.rename(ldir, dest))
        result.top = parent
        progress.done()
    return result


def _read_image(blobs: BlobDir, lay: str, src: str
                ) -> tuple[list[tuple[str, str, int]], list[str], str]:
    """The layers (digest, media type, size) and diff IDs of the one image in the layout
    skopeo wrote, every check made before anything is unpacked."""
    try:
        with open(os.path.join(lay, "index.json"), encoding="utf-8") as f:
            index = json.load(f)
        mdesc = index["manifests"][0]
        mdigest = str(mdesc["digest"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise OverlayfuseError(f"{src}: skopeo left no image index") from None
    if mdesc.get("mediaType", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise OverlayfuseError(f"{src}: unsupported manifest type {mdesc.get('mediaType')}")
    manifest = blobs.read_json(mdigest, "manifest")
    try:
        cdesc = manifest["config"]
        config = blobs.read_json(str(cdesc["digest"]), "config")  # type: ignore[index]
        layers = [(str(d["digest"]), str(d["mediaType"]), int(d["size"]))
                  for d in manifest["layers"]]  # type: ignore[attr-defined]
        diff_ids = [str(x) for x in config["rootfs"]["diff_ids"]]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise OverlayfuseError(f"{src}: a malformed image manifest or config") from None
    if len(layers) != len(diff_ids):
        raise OverlayfuseError(f"{src}: {len(layers)} layers but {len(diff_ids)} diff IDs")
    for digest, media_type, _ in layers:
        if media_type not in LAYER_TYPES:
            raise OverlayfuseError(f"{src}: layer {digest} has the media type {media_type}, "
                                   "which overlayfuse cannot unpack; nothing imported")
        _hex(digest)
    for d in diff_ids:
        _hex(d)
    arch = config.get("architecture")
    here = GOARCH.get(platform.machine(), platform.machine())
    if arch and arch != here:
        log.warning("%s is an image for %s, this machine is %s", src, arch, here)
    return layers, diff_ids, mdigest
