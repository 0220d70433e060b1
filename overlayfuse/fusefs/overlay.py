"""The state of one mounted overlay: layers, inode table, work dir and the helpers all ops share."""
from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

import pyfuse3

from .. import format as fmt
from ..errors import OverlayfuseError
from ..fuseopts import DEFAULT_SPIN_US
from ..idmap import Owners, owners_from_options
from ..spec import OverlaySpec
from . import durable, inuse, origin
from .record import UpperRecord
from .inodes import ROOT, InodeTable, Node
from .layers import DirFds, Layer, join, open_layers, openat2_beneath, split
from .override import Overrides

WRITEBACK_ENV = "OVERLAYFUSE_WRITEBACK"  # "1": the writeback cache on every mount (for tests)
WORK_SUBDIR = b"work"          # temp files of copy-up and atomic creates (as the kernel uses)
INDEX_SUBDIR = b"index"        # hard-link index, where and as the kernel keeps it


@dataclass
class Config:
    """Knobs of the daemon; the cache timeouts are the main speed lever (PYFUSE3-FACTS)."""

    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    keep_cache: bool = True
    atime: str = "relatime"  # the mount's atime option (atime.py)
    as_root: bool = False
    owners: Owners = field(default_factory=Owners)  # uid/gid mapping and squashing
    static_nlink: bool = False  # every directory reports nlink 1 (fuse-overlayfs' option)
    xattrs: bool = True  # noxattrs=1: the mount has no xattrs (fuse-overlayfs' option)
    acl: bool = True  # noacl: POSIX ACLs not enforced on a root mount (fuse-overlayfs' option)
    zero_opens: bool = False  # -o zero_opens: zero-message file opens (fusefs/transport.py)
    xattr_permissions: int = 0  # 1|2: owners and modes in an override xattr (override.py)
    writeback: bool = False  # -o writeback=1: the kernel's writeback cache (file.backing_flags)
    readdirplus_auto: bool = False  # -o readdirplus_auto: plain READDIR too (readdir.py)
    spin_us: int = DEFAULT_SPIN_US  # -o spin=US: an idle daemon polls before it sleeps (transport)

    @classmethod
    def for_spec(cls, spec: OverlaySpec, as_root: bool) -> "Config":
        """The daemon's knobs for a spec's FUSE options (fuseopts.py checked their values)."""
        opts = spec.fuse_option_map()
        config = cls(as_root=as_root, owners=owners_from_options(opts),
                     static_nlink="static_nlink" in opts,
                     xattrs=int(opts.get("noxattrs") or 0) == 0,
                     acl="noacl" not in opts, zero_opens="zero_opens" in opts,
                     readdirplus_auto="readdirplus_auto" in opts,
                     xattr_permissions=int(opts.get("xattr_permissions") or 0),
                     writeback=(int(opts.get("writeback") or 0) != 0
                                or os.environ.get(WRITEBACK_ENV) == "1"))
        if opts.get("spin") is not None:
            config.spin_us = int(opts["spin"])
        if opts.get("timeout") is not None:
            config.entry_timeout = config.attr_timeout = float(opts["timeout"])
        return config


class Overlay:
    """Everything the operation modules need about one mount, passed to them as ``ovl``."""

    def __init__(self, spec: OverlaySpec, config: Config) -> None:
        self.spec = spec
        self.config = config
        self.layers: list[Layer] = open_layers(spec.upperdir, spec.lowerdirs)
        self.upper: Layer | None = self.layers[0] if spec.upperdir else None
        self.lower_indexes = [layer.index for layer in self.layers if not layer.is_upper]
        self.dirfds = DirFds(self.layers)
        self.strict_fd = -1  # the upper root on a strictatime clone of its mount (atime.py)
        self.prefix = fmt.default_prefix(userxattr=spec.userxattr)
        self.overrides = Overrides(self.layers, self.upper is not None, config.xattr_permissions)
        devs: list[int] = []
        for layer in self.layers:
            if layer.dev not in devs:
                devs.append(layer.dev)
        self._fs_index = {layer.index: devs.index(layer.dev) for layer in self.layers}
        self._xino = len(devs) > 1
        self.record = UpperRecord(self.upper.root_fd if self.upper else -1, self.prefix,
                                  durable=not spec.volatile)
        # how a copy-up is made durable before its rename (durable.py); volatile: not at all
        self.copy_sync = (durable.mode_of(self.upper.root_fd)
                          if self.upper is not None and not spec.volatile else durable.NONE)
        self.work_fd = -1
        self.index_fd = -1
        self.claims: list[int] = []
        if spec.workdir:
            # before the work dir is emptied: it may be another live mount's (inuse.py)
            self.claims = inuse.claim(spec)
            try:
                self.work_fd, self.index_fd = _prepare_workdir(spec.workdir)
            except BaseException:
                inuse.release(self.claims)
                raise
        self.handles_by_ino: dict[int, list] = {}  # open files and dirs (each has an fd)
        self.epoch = 0  # layer stacks served so far (switch.py): a handle knows its stack
        self.inofiles = None  # inofiles.InodeFiles with zero-message opens (set by ops)
        # an entry the kernel holds that loses a name keeps an O_PATH fd until FORGET
        # (keep_reachable); with zero-message dirs (pin_dirs: no OPENDIR) every directory
        self.pin_dirs = False
        self.pinned: dict[int, int] = {}  # node id -> O_PATH fd kept since it lost a name
        self.copy_locks: dict[int, object] = {}  # ino -> trio.Lock while a copy-up runs
        self._uuids: dict[int, bytes] = {}
        self._lower_names: OrderedDict[tuple[int, bytes], frozenset[bytes]] = OrderedDict()
        self._lower_names_count = 0
        self._lower_misses: dict[tuple[int, bytes], int] = {}
        self._lower_too_big: set[tuple[int, bytes]] = set()
        self.lower_pos = {li: pos for pos, li in enumerate(self.lower_indexes)}
        self._first_layer: OrderedDict[int, tuple[list, dict[bytes, int]]] = OrderedDict()
        self._first_layer_count = 0
        self._listings: OrderedDict[int, list[bytes]] = OrderedDict()
        self._listed_names = 0
        self._big_listings: OrderedDict[int, list[bytes]] = OrderedDict()
        root = Node(ROOT, stat.S_IFDIR)
        root.upper = self.upper is not None
        root.lower = [(i, b"") for i in self.lower_indexes]
        if self.upper is not None and fmt.is_opaque(self.upper.root_fd, b"", self.prefix):
            root.lower = []
        self.table = InodeTable(root)

    # -- daemon-side caches -----------------------------------------------------------------
    # Only this daemon changes the layers while mounted (changing them underneath is undefined
    # for the kernel's overlayfs too), so what it read stays true until it changes it itself.
    LISTING_BUDGET = 200_000  # names kept across all cached listings

    def changed(self, *nodes: Node, listing: bool = False) -> None:
        """Forget cached attributes (and with ``listing``, the merged listing) of ``nodes``."""
        for node in nodes:
            node.st = None
            if listing:
                self._drop_listing(node.ino)

    # A directory too big for the budget is still kept while it is being listed: without an
    # open handle to hold it, every READDIR of a cached-listing mount would read the whole
    # directory again (quadratic: hours for a million entries).  Only the last few are kept.
    BIG_LISTINGS = 2

    def _drop_listing(self, ino: int) -> None:
        self._big_listings.pop(ino, None)
        names = self._listings.pop(ino, None)
        if names is not None:
            self._listed_names -= len(names)

    def listing_sent(self, node: Node) -> None:
        """The kernel holds the whole listing of ``node`` now (zero-message dirs): free ours,
        so a walk of a huge tree does not keep a full budget of names for nothing."""
        self._drop_listing(node.ino)

    def cached_listing(self, node: Node) -> list[bytes] | None:
        for cache in (self._listings, self._big_listings):
            names = cache.get(node.ino)
            if names is not None:
                cache.move_to_end(node.ino)
                return names
        return None

    def cache_listing(self, node: Node, names: list[bytes]) -> None:
        self._drop_listing(node.ino)
        if len(names) > self.LISTING_BUDGET // 4:
            self._big_listings[node.ino] = names
            while len(self._big_listings) > self.BIG_LISTINGS:
                self._big_listings.popitem(last=False)
            return
        self._listings[node.ino] = names
        self._listed_names += len(names)
        while self._listed_names > self.LISTING_BUDGET:
            _, old = self._listings.popitem(last=False)
            self._listed_names -= len(old)

    # Lower layers never change under a mount, so their directories' names can be kept for
    # good (within a budget): a lookup through many layers then costs a set lookup per layer
    # that lacks the name instead of a syscall.  Built for a directory once lookups miss in it
    # a few times, so a single lookup never pays for reading a whole directory.
    LOWER_NAMES_BUDGET = 200_000
    LOWER_NAMES_AFTER_MISSES = 4

    def lower_names(self, layer: int, path: bytes) -> frozenset[bytes] | None:
        key = (layer, path)
        names = self._lower_names.get(key)
        if names is not None:
            self._lower_names.move_to_end(key)
            return names
        if key in self._lower_too_big:
            return None  # never kept: reading it again for every few lookups is quadratic
        misses = self._lower_misses.get(key, 0) + 1
        self._lower_misses[key] = misses
        if misses < self.LOWER_NAMES_AFTER_MISSES:
            return None
        del self._lower_misses[key]
        try:
            fd = openat2_beneath(self.layers[layer].root_fd, path or b".",
                                 os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        limit = self.LOWER_NAMES_BUDGET // 4
        found: list[bytes] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    found.append(os.fsencode(entry.name))
                    if len(found) > limit:  # stop early: its names would not be kept
                        self._too_big(key)
                        return None
        finally:
            os.close(fd)
        names = frozenset(found)
        self.remember_lower_names(layer, path, names)
        return names

    def _too_big(self, key: tuple[int, bytes]) -> None:
        if len(self._lower_too_big) > 65536:
            self._lower_too_big.clear()
        self._lower_too_big.add(key)

    def remember_lower_names(self, layer: int, path: bytes, names: frozenset[bytes]) -> None:
        """Keep a lower dir's names (readdir has just read them anyway)."""
        key = (layer, path)
        if key in self._lower_names:
            return
        if len(names) > self.LOWER_NAMES_BUDGET // 4:
            self._too_big(key)
            return
        self._lower_names[key] = names
        self._lower_names_count += len(names)
        while self._lower_names_count > self.LOWER_NAMES_BUDGET and len(self._lower_names) > 1:
            _, old = self._lower_names.popitem(last=False)
            self._lower_names_count -= len(old)
        if len(self._lower_misses) > 65536:
            self._lower_misses.clear()

    def first_lower(self, node: Node) -> dict[bytes, int] | None:
        """For a directory merged from several lowers: each name of its lower stack (an OCI
        ``.wh.`` marker counts for the name it hides) -> the first layer that has it.  A lookup
        then starts at that layer instead of asking every layer above it, so a cached lookup
        costs the same through 500 layers as through 2.  Built from the per-layer name sets
        once all of them are known; None until then."""
        entry = self._first_layer.get(node.ino)
        if entry is not None and entry[0] is node.lower:
            self._first_layer.move_to_end(node.ino)
            return entry[1]
        sets = []
        for key in node.lower:
            names = self._lower_names.get(key)
            if names is None:
                return None
            sets.append((key[0], names))
        first: dict[bytes, int] = {}
        cut = len(fmt.WH_PREFIX)
        for li, names in reversed(sets):  # upper layers overwrite: the first one wins
            for name in names:
                first[name] = li
                if name.startswith(fmt.WH_PREFIX):
                    first[name[cut:]] = li
        if entry is not None:
            self._first_layer_count -= len(entry[1])
        self._first_layer[node.ino] = (node.lower, first)
        self._first_layer_count += len(first)
        while self._first_layer_count > self.LOWER_NAMES_BUDGET and len(self._first_layer) > 1:
            _, (_, old) = self._first_layer.popitem(last=False)
            self._first_layer_count -= len(old)
        return first

    # -- inode numbers -------------------------------------------------------------------
    def encode_ino(self, layer: int, real_ino: int) -> int:
        """The overlay inode number of a real inode: unique across layers on several devices
        (the kernel's xino idea: the filesystem's index in the high bits)."""
        ino = real_ino | (self._fs_index[layer] << 58) if self._xino else real_ino
        if ino <= ROOT:
            ino |= 1 << 63
        return ino

    def layer_uuid(self, layer: int) -> bytes:
        uuid = self._uuids.get(layer)
        if uuid is None:
            uuid = self._uuids[layer] = origin.fs_uuid(self.layers[layer].root_fd)
        return uuid

    def origin_of(self, layer: int, dirfd: int, name: bytes) -> bytes | None:
        """The kernel's origin value for a lower entry (see origin.py)."""
        return origin.encode(dirfd, name, self.layer_uuid(layer))

    # -- backing locations -----------------------------------------------------------------
    def upper_dirfd(self, node: Node) -> int:
        """fd of the node's own directory in the upper layer (the node must be an upper dir)."""
        return self.dirfds.get(0, node.upath())

    def upper_location(self, node: Node) -> tuple[int, bytes]:
        """(parent dir fd, name) of the node's entry in the upper layer."""
        parent, name = node.parent_and_name()
        return self.upper_dirfd(parent), name

    def lower_location(self, node: Node) -> tuple[int, bytes]:
        layer, path = node.lower[0]
        if path is None:  # in_parent_lower: a single-link file, in its parent's dir there
            parent, name = node.parent_and_name()
            for li, dir_path in parent.lower:
                if li == layer:
                    return self.dirfds.get(layer, dir_path), name
            raise pyfuse3.FUSEError(errno.ENOENT)
        head, tail = split(path)
        return self.dirfds.get(layer, head), tail

    def location(self, node: Node) -> tuple[int, bytes]:
        """(dir fd, name) of the entry that currently holds the node's data and attributes.

        A hard-linked inode lives in its index file, whichever of its names the kernel used.
        """
        if node.index is not None:
            return self.index_fd, node.index
        if node.upper:
            if node.ino == ROOT:
                return self.upper.root_fd, b""
            return self.upper_location(node)
        if node.ino == ROOT:
            return self.layers[node.lower[0][0]].root_fd, b""
        return self.lower_location(node)

    def lstat(self, node: Node) -> os.stat_result:
        dirfd, name = self.location(node)
        if not name:
            return os.fstat(dirfd)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def open_fd(self, node: Node, writable_layer: bool = False) -> int:
        """An fd of an open handle on ``node`` (-1 if none): how a file or dir whose last
        name is gone is still reached.  ``writable_layer``: only one into the upper layer
        (a read-only handle may point into a lower, which must never change)."""
        for handle in self.handles_by_ino.get(node.ino, ()):
            # file handles: (upper?, index name, epoch); a switch since makes it a lower's
            source = getattr(handle, "source", None)
            if handle.fd >= 0 and (not writable_layer
                                   or source is not None and (source[0] or source[1])
                                   and source[2] == self.epoch):
                return handle.fd
        pinned = self.pinned.get(node.ino, -1) if self.pinned else -1
        if pinned >= 0 and (not writable_layer or node.upper or node.index is not None):
            return pinned
        if self.inofiles is not None:  # zero-message opens: the fd pinned when it lost its name
            return self.inofiles.upper_fd(node) if writable_layer else self.inofiles.pinned_fd(node)
        return -1

    def keep_reachable(self, node: Node) -> None:
        """Before ``node`` loses a name that may be its last, while the kernel holds it: keep
        an fd that still reaches it.  A file must stay reachable (an OPEN may race the unlink,
        the kernel may have it open without our knowing), a dir must answer fstat; and while
        the fd holds the backing inode, the backing filesystem cannot give its number to a new
        entry.  It would then become this node id's successor (InodeTable._succeed), and the
        kernel marks an inode bad when its node id comes back with a new generation: EIO for
        whoever still uses the old one, a path walk through a removed dir for one (test_reuse)."""
        if self.inofiles is not None:
            self.inofiles.pin(node)
        elif node.ino not in self.pinned and (node.lookups > 0 or self.pin_dirs and node.is_dir):
            dirfd, name = self.location(node)
            try:
                self.pinned[node.ino] = os.open(
                    name or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EACCES, errno.ELOOP):
                    raise

    def forget_inode(self, ino: int) -> None:
        """The kernel forgot an inode this daemon no longer holds: drop what reached it."""
        if self.inofiles is not None:
            self.inofiles.forget(ino)
        fd = self.pinned.pop(ino, -1) if self.pinned else -1
        if fd >= 0:
            os.close(fd)

    def forget_handle(self, handle) -> None:
        """A file or directory handle is closed: no longer an fd for its inode."""
        same = self.handles_by_ino.get(handle.node.ino)
        if same is not None:
            same.remove(handle)
            if not same:
                del self.handles_by_ino[handle.node.ino]

    def require_writable(self) -> None:
        """Refuse a change to a read-only overlay; before the first change, write the
        upper's record (record.py), so that its namespace is known to every later reader."""
        if self.upper is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.record.features is None:
            self.record.note()

    def close(self) -> None:
        if self.strict_fd >= 0:
            os.close(self.strict_fd)
        for fd in self.pinned.values():
            os.close(fd)
        self.pinned.clear()
        if self.inofiles is not None:
            self.inofiles.close()
        self.dirfds.close()
        for layer in self.layers:
            os.close(layer.root_fd)
        for fd in (self.work_fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        inuse.release(self.claims)


def _prepare_workdir(workdir: str) -> tuple[int, int]:
    """Open (creating) work/ and the hard-link index; empty work/ of a crashed mount's temps."""
    root = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fds = []
        for sub in (WORK_SUBDIR, INDEX_SUBDIR):
            try:
                st = os.stat(sub, dir_fd=root, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode) and sub == INDEX_SUBDIR:
                    # the kernel keeps an index it finds and refuses one that is no dir
                    where = os.path.join(workdir, os.fsdecode(sub))
                    raise OverlayfuseError(f"{where} is not a directory (ENOTDIR, as the "
                                           f"kernel refuses it): remove it")
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(sub, dir_fd=root)  # never follow a planted link: replace it
                    raise FileNotFoundError
                _make_usable(workdir, sub, root, st)
            except FileNotFoundError:
                os.mkdir(sub, 0o700, dir_fd=root)
            fds.append(os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=root))
        _clean_tree(fds[0])
        return fds[0], fds[1]
    finally:
        os.close(root)


def _make_usable(workdir: str, sub: bytes, root: int, st: os.stat_result) -> None:
    """The kernel makes work/ and index/ with mode 000 (only its own, privileged access goes
    in); a daemon that is not root cannot enter them.  It opens up what it owns, and replaces
    an empty work/ of another user (root's kernel mount of a user's layers leaves one), as the
    kernel itself recreates work/ at every mount.  Anything else gets a plain refusal."""
    if os.geteuid() == 0 or stat.S_IMODE(st.st_mode) & 0o700 == 0o700:
        return
    if st.st_uid == os.geteuid():
        fd = os.open(sub, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        try:
            os.chmod(fmt.proc_path(fd, b""), stat.S_IMODE(st.st_mode) | 0o700)
        finally:
            os.close(fd)
        return
    if sub == WORK_SUBDIR:
        try:
            os.rmdir(sub, dir_fd=root)  # only its temp files live there, and it holds none
            os.mkdir(sub, 0o700, dir_fd=root)
            return
        except OSError:
            pass
    where = os.path.join(workdir, os.fsdecode(sub))
    raise OverlayfuseError(f"work dir {where} belongs to uid {st.st_uid} and is mode "
                           f"{stat.S_IMODE(st.st_mode):03o}: use a work dir of your own")


def _clean_tree(dirfd: int) -> None:
    """Remove everything inside dirfd (left-overs of an interrupted copy-up), never following."""
    for name in os.listdir(dirfd):
        try:
            os.unlink(name, dir_fd=dirfd)
        except IsADirectoryError:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            try:
                _clean_tree(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dirfd)
        except PermissionError:
            os.rmdir(name, dir_fd=dirfd)


__all__ = ["Config", "Overlay", "WORK_SUBDIR", "INDEX_SUBDIR", "join", "split"]
