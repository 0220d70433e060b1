"""A command run with a use's merged tree as ``/``: the overlay mounted inside the sandbox.

``store run``, ``store shell`` and every ``build`` step come here.  The sandbox
(``overlayfuse.sandbox``) makes the namespaces; its ``prepare`` mounts the use's overlay in the
new mount namespace: with the kernel (as root the plain kernel overlay, as a normal user the
kernel overlay in the user namespace, ``userxattr``), or, where the kernel refuses that (or
``--backend fuse``), with the FUSE daemon started inside the same namespaces.  So the mount,
and every process of the command (the daemon too), vanish with the command.  A normal user is
root inside, and the user's subordinate ranges give every other ID (one ID only without ranges,
or with ``map_root``); the layers then hold files those IDs own, which the store's housekeeping
removes in the same map.  Root on a normal user's store runs in that user's map too: what it
writes stays the user's to remove.

``--overlay SRC:DST`` (vagga's Snapshot volume, podman's ``:O``) shows the host dir SRC
writable at DST: an overlay of its own, SRC its only lower, mounted on the tree by the same
backend as the tree, its upper and work dir in a ``TmpEntry`` of the store's ``tmp/`` (removed
after the run, by ``gc`` after a killed one), so SRC stays as it was.

The sandbox makes the mount points a tree lacks (``/proc``, ``/dev``, ``/sys``, ``--bind`` and
``--overlay`` targets); made here first, they are taken out of a kept upper again afterwards,
so a data-only tree's layers do not fill up with empty mount points.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

from ..backends.choose import choose
from ..backends.kernel import mount_or_explain
from ..errors import OverlayfuseError
from ..format import default_prefix, is_opaque, is_whiteout_stat, is_xattr_whiteout
from ..sandbox import Bind, CommandError, Sandbox, plan_ids
from ..sandbox.idmaps import IdMode
from ..sandbox import run as sandbox_run
from ..sandbox.launch import clean_env
from ..sandbox.process import SETUP_FAILED
from ..sandbox.rootfs import check_tree_path, resolve_in
from ..spec import OverlaySpec
from ..sysmount.syscalls import (CLONE_NEWNS, MS_BIND, MS_PRIVATE, MS_RDONLY, MS_REC,
                                 MS_REMOUNT, mount, unshare)
from .disk import TmpEntry, as_owner, make_layer_root
from .store import LayerStore

log = logging.getLogger(__name__)

MOUNT_POINTS = ("proc", "dev", "sys")
MS_SHARED = 1 << 20
Network = Literal["host", "none"]


@dataclass(frozen=True)
class OverlayVolume:
    """The host dir ``source`` shown writable at ``target`` in the tree, its changes thrown
    away after the run (``--overlay SRC:DST``)."""

    source: str
    target: str

    @classmethod
    def parse(cls, text: str) -> "OverlayVolume":
        """``SRC:DST``, the form of ``--overlay`` (DST is required: no default place)."""
        src, sep, dst = text.partition(":")
        if not src or not sep or not dst or ":" in dst:
            raise OverlayfuseError(f"--overlay {text}: expected SRC:DST")
        return cls(os.path.abspath(src), dst)

    def check(self) -> None:
        """OverlayfuseError unless the source is a directory and the target a tree path."""
        if not os.path.isdir(self.source):
            what = "not a directory" if os.path.exists(self.source) else \
                "no such file or directory"
            raise OverlayfuseError(f"--overlay {self.source}: {what}")
        check_tree_path(self.target, f"--overlay target {self.target}")


def run_rooted(store: LayerStore, spec: OverlaySpec, argv: Sequence[str], *,
               backend: str = "auto", binds: Sequence[Bind] = (), network: Network = "host",
               cwd: str | None = None, env: dict[str, str] | None = None,
               readonly: bool = False, keep_upper: bool = False, verbose: bool = False,
               map_root: bool = False, overlays: Sequence[OverlayVolume] = (),
               inside: Callable[[str], None] | None = None, live: str | None = None) -> int:
    """Run ``argv`` with the merged tree of ``spec`` (which has an upper) as ``/``.

    ``readonly`` shows the tree read-only; ``keep_upper`` says the upper outlives the run
    (the mount points made for it are taken out again).  ``map_root`` maps one ID only (root
    inside is the user) even when the user has subordinate ranges.  ``overlays`` are host dirs
    shown writable with a throwaway upper.  ``inside`` (with no ``argv``) is work done in
    the sandbox instead of a command: called with the mounted tree's path as root of the
    tree's user namespace, before the tree becomes ``/``.  The command's exit status;
    OverlayfuseError for a set-up failure, CommandError (126/127) when it cannot start.
    ``live``: the tree is that mount (a config's writable FUSE mount, bound as it is), not
    ``spec``'s: the command's changes go through its daemon, seen there as they happen.
    """
    if live is not None:
        spec = OverlaySpec(lowerdirs=(live,))  # what the run reads of the tree: the mount
    assert live is not None or spec.upperdir is not None and spec.workdir is not None
    binds = tuple(binds)
    for bind in binds:
        bind.check()
    overlays = tuple(overlays)
    for vol in overlays:
        vol.check()
    sandbox_cwd = tree_cwd(cwd)
    chosen, why = choose(spec, "run", backend) if live is None or overlays else \
        (None, f"the live mount at {live}")
    idmap: IdMode = "single" if map_root else "auto"
    owner = store.owner
    plan = plan_ids(idmap, owner)
    userxattr = plan.mode != "host"
    who = "kernel overlayfs in a user namespace" if userxattr else "kernel overlayfs"
    if verbose:
        print(f"overlayfuse: {why}", file=sys.stderr)
        print(f"overlayfuse: {plan.note}", file=sys.stderr)
    points = mount_points([*(b.target for b in binds), *(v.target for v in overlays)])
    made = absent_from(spec, points) if keep_upper else []
    with ExitStack() as stack:
        mnt = stack.enter_context(TmpEntry(store.layout, "root-" + os.urandom(6).hex()))
        vol_specs = volume_specs(stack, store, overlays)

        def mount_tree(tree_spec: OverlaySpec, target: str) -> None:
            if chosen.name == "fuse":
                mount_fuse_inside(tree_spec, target, userxattr=userxattr)
            else:
                mount_or_explain(tree_spec, target, userxattr=userxattr, who=who)

        def prepare() -> None:
            if live is not None:
                mount(live, mnt.path, None, MS_BIND | MS_REC)
            else:
                mount_tree(spec, mnt.path)
            make_mount_points(mnt.path, binds, [v.target for v in overlays])
            for vol, vol_spec in zip(overlays, vol_specs):
                mount_tree(vol_spec, resolve_in(mnt.path, vol.target))
            if inside is not None:
                inside(mnt.path)
            if readonly:
                mount(mnt.path, mnt.path, None, MS_BIND | MS_REC)
                mount(None, mnt.path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)

        sandbox = Sandbox(mnt.path, binds=binds, network=network, cwd=sandbox_cwd,
                          env=command_env(env), idmap=idmap, owner=owner, prepare=prepare)
        try:
            return sandbox_run(sandbox, argv, setup_only=inside is not None and not argv)
        finally:
            drop_made(live or spec.upperdir, made)  # through the mount, if live


def mount_fuse_inside(spec: OverlaySpec, target: str, *, userxattr: bool) -> None:
    """Mount ``spec`` on ``target`` with the FUSE daemon started here, in the sandbox's user
    namespace (as podman runs fuse-overlayfs): root there with every mapped ID, it stores each
    owner a command sets, as the subordinate ID on the host.  With ``userxattr`` its markers are
    ``user.overlay.*``, as the kernel's in a user namespace would be (one format for both).

    The daemon gets a mount namespace of its own, a copy of this one taken before the tree is
    mounted: the mount reaches this namespace through a shared mount point (then made private
    again), and the sandbox's pivot_root, which detaches the host's root here, leaves the
    daemon's view of the host (its layers, Python's modules) whole.  It is in the sandbox's PID
    namespace: the kernel kills it when the command's init exits.  Without the writeback cache
    every write the command saw return has reached the upper already; a copy-up is renamed into
    place whole.
    """
    # the daemon refuses a mount point that is one already: its parent is the shared one
    # (bound with what is mounted below it: an --overlay volume mounted before stays)
    parent = os.path.dirname(os.path.abspath(target))
    mount(parent, parent, None, MS_BIND | MS_REC)
    mount(None, parent, None, MS_SHARED)
    if userxattr and not spec.userxattr:
        spec = replace(spec, options=spec.options + (("userxattr", None),))
    argv = [sys.executable, "-m", "overlayfuse", "mount", "--backend", "fuse",
            "-o", spec.to_options(), target]
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked process
        try:
            os.close(r)
            os.dup2(w, 2)
            unshare(CLONE_NEWNS)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.execve(argv[0], argv, env)
        finally:
            os._exit(SETUP_FAILED)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode(errors="replace").strip()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status != 0:
        last = said.splitlines()[-1] if said else f"status {status}"
        raise OverlayfuseError(f"the FUSE daemon cannot mount the tree: "
                               f"{last.removeprefix('overlayfuse: ')}")
    mount(None, parent, None, MS_REC | MS_PRIVATE)


def tree_cwd(cwd: str | None) -> str:
    """``--cwd``: a path in the tree (a relative one is taken from ``/``)."""
    if not cwd:
        return "/"
    return cwd if cwd.startswith("/") else "/" + cwd


def command_env(env: dict[str, str] | None) -> dict[str, str] | None:
    """None (the sandbox's clean environment) or ``env`` over that clean base."""
    return None if env is None else {**clean_env(), **env}


def mount_points(targets: Sequence[str]) -> list[str]:
    """The tree paths a run mounts on (and their parents), relative, parents first."""
    out = list(MOUNT_POINTS)
    for target in targets:
        parts = [p for p in target.split("/") if p]
        for n in range(1, len(parts) + 1):
            rel = "/".join(parts[:n])
            if rel not in out:
                out.append(rel)
    return out


def volume_specs(stack: ExitStack, store: LayerStore,
                 overlays: Sequence[OverlayVolume]) -> list[OverlaySpec]:
    """An overlay spec per ``--overlay``: SRC the lower, a fresh upper (its root like SRC's)
    and work dir in one ``TmpEntry`` that ``stack`` removes after the run."""
    if not overlays:
        return []
    entry = stack.enter_context(TmpEntry(store.layout, "vol-" + os.urandom(6).hex()))
    st = os.stat(entry.path)
    specs = []
    for n, vol in enumerate(overlays):
        upper, work = (os.path.join(entry.path, f"{n}.{k}") for k in ("upper", "work"))
        make_layer_root(upper, vol.source, None)
        os.mkdir(work, 0o700)
        if os.geteuid() == 0:  # root on a user's store: the entry is the user's
            os.chown(work, st.st_uid, st.st_gid)
        specs.append(OverlaySpec(lowerdirs=(vol.source,), upperdir=upper, workdir=work))
    return specs


def absent_from(spec: OverlaySpec, paths: Sequence[str]) -> list[str]:
    """Those of ``paths`` no layer of ``spec`` holds: made for the run, if made at all."""
    layers = [d for d in (spec.upperdir, *spec.lowerdirs) if d is not None]
    return [p for p in paths if not any(os.path.lexists(os.path.join(d, p)) for d in layers)]


def make_mount_points(root: str, binds: Sequence[Bind], dirs: Sequence[str] = ()) -> None:
    """What the sandbox would make, made before a read-only remount (as it makes them), and
    the ``dirs`` the ``--overlay`` volumes are mounted on."""
    for name in MOUNT_POINTS:
        host = resolve_in(root, "/" + name)
        if not os.path.lexists(host):
            os.mkdir(host, 0o755)
    for bind in binds:
        host = resolve_in(root, bind.target)
        if os.path.lexists(host):
            continue
        os.makedirs(os.path.dirname(host), exist_ok=True)
        if os.path.isdir(bind.source):
            os.mkdir(host, 0o755)
        else:
            os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    for target in dirs:
        os.makedirs(resolve_in(root, target), 0o755, exist_ok=True)


def drop_made(upper: str, made: Sequence[str]) -> None:
    """Take the mount points made for a run out of its kept upper: only what is still an empty
    dir or an empty file there (deepest first), so nothing the command wrote goes.  As root of
    the user's namespace where the run gave the tree's root to a subordinate ID."""
    for rel in sorted(made, key=lambda p: p.count("/"), reverse=True):
        path = os.path.join(upper, rel)
        try:
            as_owner(lambda: _drop_if_untouched(path))
        except OSError as e:
            log.warning("cannot take the mount point %s out of the layer: %s", path, e)


def _drop_if_untouched(path: str) -> None:
    try:
        st = os.lstat(path)
        if os.path.isdir(path) and not os.path.islink(path):
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isfile(path) and not os.path.islink(path) and st.st_size == 0 \
                and not os.listxattr(path, follow_symlinks=False):
            os.unlink(path)
    except FileNotFoundError:
        pass


def root_shell(spec: OverlaySpec) -> str:
    """The shell of root's passwd entry in the merged tree of ``spec``, else ``/bin/sh``."""
    text = tree_file(spec, "etc/passwd")
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == "root" and fields[6].startswith("/"):
            return fields[6]
    return "/bin/sh"


def tree_file(spec: OverlaySpec, rel: str) -> str | None:
    """The text of ``rel`` (a plain file, no symlink on the way) as the merged tree shows it,
    read from the layers top down: a whiteout or an opaque dir above ends the search."""
    prefix = default_prefix(spec.userxattr)
    parts = rel.split("/")
    for layer in (d for d in (spec.upperdir, *spec.lowerdirs) if d is not None):
        here = layer
        for n, name in enumerate(parts):
            try:
                fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                break
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                break
            try:
                if is_whiteout_stat(st) or is_xattr_whiteout(fd, name.encode(), st, prefix):
                    return None
                last = n == len(parts) - 1
                if not last and is_opaque(fd, name.encode(), prefix):
                    hidden = not os.path.lexists(os.path.join(here, name, *parts[n + 1:]))
                    if hidden:
                        return None
            finally:
                os.close(fd)
            here = os.path.join(here, name)
            if last:
                try:
                    file_fd = os.open(here, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with open(file_fd, encoding="utf-8", errors="replace") as f:
                        return f.read()
                except OSError:
                    return None
    return None


def shell_error(e: CommandError, shell: str) -> CommandError:
    """The tree has no usable shell: say so in one line, with the status the shell gave."""
    return CommandError(f"no shell to run in the tree: {shell}: {str(e).split(': ')[-1]}",
                        e.status)
