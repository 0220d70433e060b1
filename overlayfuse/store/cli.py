"""``overlayfuse store ...`` and ``overlayfuse build ...``: the command line of the layer store.

``cli.py`` only dispatches here; every failure ends as one ``overlayfuse: ...`` line.
"""
from __future__ import annotations

import argparse
import shlex
import sqlite3
import sys
import time

from ..backends.choose import BACKEND_NAMES
from ..errors import OverlayfuseError
from ..run import command_status
from ..sandbox import Bind, CommandError
from .api import LayerStore
from .buildcache import CachedStep, cached_steps, prune
from .remotecache import RemoteCache
from .config import unmount_recorded
from .disk import human
from .image import Access, export_image, export_tar, prune_blob_cache
from .stepfile import parse_env

STORE_COMMANDS = ("init", "mount", "umount", "run", "shell", "snapshot", "rollback", "snapshots",
                  "remove-snapshot", "clean", "scrub", "gc", "info", "configs")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="DIR",
                   help="the store (default $XDG_DATA_HOME/overlayfuse, else "
                        "~/.local/share/overlayfuse)")
    p.add_argument("--config", default="default", metavar="NAME",
                   help="the config (default: default)")


def _sandbox_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:ro]]",
                   help="show the host path SRC at DST in the tree (repeatable)")
    p.add_argument("--network", default="host", choices=("host", "none"),
                   help="the host's network (default) or none (loopback only)")


def _run_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--writable", action="store_true",
                   help="a throwaway upper: the changes vanish afterwards")
    c.add_argument("--snapshot", metavar="NAME", help="run in this snapshot (read-only "
                                                      "unless --writable)")
    c.add_argument("--failed", action="store_true",
                   help="in the partial result of the step that failed in the last build, "
                        "with its environment, on a throwaway upper")
    c.add_argument("--cwd", metavar="DIR", help="working directory in the tree (default /)")
    _sandbox_options(c)
    c.add_argument("--overlay", action="append", default=[], metavar="SRC:DST",
                   help="show the host dir SRC writable at DST, its changes thrown away "
                        "(repeatable)")
    c.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES)
    c.add_argument("--map-root", action="store_true",
                   help="map one ID only (root inside is the calling user), not the "
                        "subordinate ranges of /etc/subuid and /etc/subgid")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="say which backend and which IDs, and why")


def add_store_parsers(sub: argparse._SubParsersAction) -> None:
    """``store`` (with its own subcommands) and ``build``."""
    p = sub.add_parser("store", help="a layer store: snapshots, rollbacks, shared layers",
                       description="Configs of layers with snapshots (like mock's overlayfs "
                                   "plugin), mounted or run through any backend.")
    _common(p)
    cmds = p.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    c = cmds.add_parser("init", help="create the config (and the store) from a dir, a "
                                     "tarball, another config's snapshot, or empty; snapshot "
                                     "postinit")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--from", dest="from_dir", metavar="DIR")
    src.add_argument("--from-tar", metavar="FILE",
                     help="a root filesystem tarball (plain, gzip, bzip2, xz or zstd): owners "
                          "(a normal user's as its subordinate IDs), modes, times, xattrs, "
                          "hard links; device nodes skipped")
    src.add_argument("--from-config", metavar="CONFIG[:SNAPSHOT]")
    _add_image_options(cmds, c, src)
    c = cmds.add_parser("mount", help="mount the current state writable (a snapshot: read-only)")
    c.add_argument("--backend", default="auto", choices=("auto", "kernel", "fuse"))
    c.add_argument("--snapshot", metavar="NAME", help="mount this snapshot read-only")
    c.add_argument("-v", "--verbose", action="store_true", help="say which backend and why")
    c.add_argument("mountpoint", metavar="MNT")
    c = cmds.add_parser("umount", help="unmount a mount of this store")
    c.add_argument("mountpoint", metavar="MNT")
    c = cmds.add_parser("run", help="run a command with the current state as /",
                        description="Run CMD with the config's merged tree as / (own mount, "
                                    "PID, UTS and IPC namespaces; a fresh /proc, a small /dev, "
                                    "/sys read-only, the host's resolv.conf and hosts shown); "
                                    "host paths only through --bind.")
    _run_options(c)
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    c = cmds.add_parser("shell", help="an interactive shell with the current state as /",
                        description="Root's shell from the tree's /etc/passwd (else /bin/sh) "
                                    "with the config's merged tree as /, as run does.")
    _run_options(c)
    for name, text in (("snapshot", "freeze the current state as NAME"),
                       ("rollback", "make NAME current, dropping unsaved changes"),
                       ("remove-snapshot", "forget NAME (its layer goes when nothing holds "
                                           "it)")):
        c = cmds.add_parser(name, help=text)
        c.add_argument("name", metavar="NAME")
        if name == "snapshot":
            c.add_argument("--force", action="store_true",
                           help="move NAME when it exists (refused otherwise)")
    cmds.add_parser("snapshots", help="list the snapshots, '* ' before the current ones")
    cmds.add_parser("clean", help="drop the changes made since the current snapshot")
    cmds.add_parser("scrub", help="remove the config (layers other configs use stay)")
    c = cmds.add_parser("gc", help="remove leftovers of killed processes and unreferenced "
                                   "layers; with --build-cache, cached build steps")
    c.add_argument("--build-cache", action="store_true",
                   help="also remove the cached build steps no config's state or snapshot "
                        "needs, least recently used first")
    c.add_argument("--older-than", type=_days, metavar="DAYS",
                   help="with --build-cache: only steps unused for DAYS days")
    c.add_argument("--max-size", type=_size, metavar="SIZE",
                   help="with --build-cache: until the unneeded steps take at most SIZE "
                        "(bytes, or with K, M, G, T)")
    cmds.add_parser("info", help="the config's layers, who holds them, which backend serves")
    cmds.add_parser("configs", help="the configs in the store")
    p.set_defaults(func=cmd_store)

    b = sub.add_parser("build", help="run a step file, caching each step's result as a layer",
                       description="Each line of STEPFILE runs with sh -c on top of the "
                                   "previous step's layer; unchanged steps are reused.")
    _common(b)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--from", dest="from_dir", metavar="DIR")
    src.add_argument("--from-tar", metavar="FILE", help="a root filesystem tarball")
    src.add_argument("--from-config", metavar="CONFIG[:SNAPSHOT]",
                     help="stand on that snapshot (or current state), wherever it is now")
    b.add_argument("--tag", metavar="SNAPSHOT",
                   help="name the result as a snapshot (an existing one: with --force)")
    b.add_argument("--force", action="store_true", help="move an existing --tag snapshot")
    b.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable for every step (repeatable; wins over ENV lines)")
    b.add_argument("--no-cache", action="store_true", help="run every step again")
    b.add_argument("--cache-from", metavar="REF",
                   help="take steps from this cache: docker://HOST/NAME (a registry "
                        "repository, one tag a step) or oci:DIR")
    b.add_argument("--cache-to", metavar="REF",
                   help="give each step's layer to this cache (the same forms)")
    b.add_argument("--tls-verify", default="true", choices=("true", "false"),
                   help="check the registry's TLS (default true; false for plain HTTP)")
    b.add_argument("--authfile", metavar="FILE", help="registry credentials (podman's form)")
    b.add_argument("--list", action="store_true",
                   help="list the store's cached steps instead of building")
    b.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES)
    _sandbox_options(b)
    b.add_argument("stepfile", metavar="STEPFILE", nargs="?",
                   help="shell steps, one a line, and COPY SRC... DST / ENV NAME=VALUE lines")
    b.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    store = LayerStore(args.base)
    try:
        if args.list:
            _print_cache(cached_steps(store))
            return 0
        if args.stepfile is None:
            raise OverlayfuseError("build needs a STEPFILE (or --list)")
        env = dict(parse_env(shlex.quote(e), "--env")[0] for e in args.env)
        return store.config(args.config).build(
            args.stepfile, from_dir=args.from_dir, from_config=args.from_config,
            from_tar=args.from_tar, tag=args.tag, force=args.force, no_cache=args.no_cache,
            backend=args.backend, binds=_binds(args.bind), network=args.network, env=env,
            remote=RemoteCache(args.cache_from, args.cache_to,
                               Access(args.tls_verify == "true", args.authfile)))
    except CommandError as e:
        print(f"overlayfuse: {e}", file=sys.stderr)
        return e.status
    except sqlite3.Error as e:
        raise OverlayfuseError(f"store catalog: {e}") from None


def cmd_store(args: argparse.Namespace) -> int:
    store = LayerStore(args.base)
    try:
        if args.store_command == "run":
            return _cmd_run(store, args)
        if args.store_command == "shell":
            return _cmd_shell(store, args)
        return _dispatch(store, args)
    except sqlite3.Error as e:
        raise OverlayfuseError(f"store catalog: {e}") from None


def _binds(texts: list[str]) -> tuple[Bind, ...]:
    return tuple(Bind.parse(t) for t in texts)


def _run_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return dict(writable=args.writable, snapshot=args.snapshot, failed=args.failed,
                backend=args.backend,
                cwd=args.cwd, binds=_binds(args.bind), network=args.network,
                verbose=args.verbose, map_root=args.map_root, overlays=args.overlay)


def _cmd_run(store: LayerStore, args: argparse.Namespace) -> int:
    def call(argv: list[str]) -> int:
        return store.config(args.config).run(argv, **_run_kwargs(args))  # type: ignore[arg-type]
    return command_status(args.command, "overlayfuse store run [...] -- CMD [ARGS]", call)


def _cmd_shell(store: LayerStore, args: argparse.Namespace) -> int:
    return command_status(["shell"], "overlayfuse store shell",
                          lambda _: store.config(args.config).shell(**_run_kwargs(args)))


def _dispatch(store: LayerStore, args: argparse.Namespace) -> int:
    cmd = args.store_command
    if cmd == "configs":
        for c in store.configs():
            current = ",".join(c["current"]) or "-"  # type: ignore[arg-type]
            print(f"{c['name']}\tcurrent: {current}\t{c['layers']} layers\t"
                  f"{human(c['size'])}")  # type: ignore[arg-type]
        return 0
    if cmd == "gc":
        if args.build_cache:
            p = prune(store, args.older_than, args.max_size)
            print(f"gc: {p['removed']} cached build steps removed ({human(p['freed'])} "
                  f"freed), {p['kept']} kept")
        elif args.older_than is not None or args.max_size is not None:
            raise OverlayfuseError("--older-than and --max-size go with --build-cache")
        r = store.gc()
        prune_blob_cache(store)
        print(f"gc: {r['layers']} layers kept, {r['removed']} dirs and {r['leftovers']} "
              f"leftovers removed" + (f", {r['missing']} layers MISSING" if r["missing"]
                                      else ""))
        return 1 if r["missing"] else 0
    if cmd == "umount":
        unmount_recorded(store, args.mountpoint)
        return 0
    if cmd == "export" or (cmd == "init" and args.from_image):
        return _cmd_image(store, args)
    config = store.config(args.config)
    if cmd == "init":
        for line in config.init(from_dir=args.from_dir, from_config=args.from_config,
                                from_tar=args.from_tar):
            print(f"overlayfuse: {line}", file=sys.stderr)
    elif cmd == "mount":
        m = config.mount(args.mountpoint, args.backend, snapshot=args.snapshot,
                         verbose=args.verbose)
        if args.verbose:
            print(f"overlayfuse: mounted {config.name} on {m.target} ({m.backend})",
                  file=sys.stderr)
    elif cmd == "snapshot":
        config.snapshot(args.name, force=args.force)
    elif cmd == "rollback":
        config.rollback(args.name)
    elif cmd == "remove-snapshot":
        config.remove_snapshot(args.name)
    elif cmd == "snapshots":
        for s in config.snapshots():
            print(("* " if s.current else "  ") + s.name)
    elif cmd == "clean":
        config.clean()
    elif cmd == "scrub":
        config.scrub()
    elif cmd == "info":
        _print_info(config.info())
    return 0


def _print_info(info: dict[str, object]) -> None:
    print(f"config:    {info['config']} (made from {info['origin']})")
    print(f"xattrs:    {info['namespace']}.overlay.*")
    print("layers (upper first):")
    for layer in info["layers"]:  # type: ignore[attr-defined]
        parent = layer["parent"] or "-"
        print(f"  {layer['id']}  parent {parent:16}  {human(layer['size']):>10}  held by "
              + (", ".join(layer["held_by"]) or "nothing"))
    for use in info["uses"]:  # type: ignore[attr-defined]
        print(f"in use:    {use}")
    for purpose, why in info["backends"].items():  # type: ignore[attr-defined]
        print(f"{purpose + ':':10} {why}")


def _print_cache(steps: list[CachedStep]) -> None:
    """``build --list``: one line a cached step; ``needed`` when a state or snapshot uses it."""
    now = time.time()
    print(f"{'CONFIG':12} {'STEP':>4}  {'KEY':12}  {'SIZE':>9}  {'USED':>9}  {'STATE':6}  TEXT")
    for s in steps:
        age = now - s.used
        used = (f"{age / 86400:.0f} d ago" if age >= 86400 else f"{age / 3600:.0f} h ago"
                if age >= 3600 else f"{age / 60:.0f} min ago")
        print(f"{s.config:12} {s.number or '?':>4}  {s.key[:12]}  "
              f"{human(s.size) if s.size else '-':>9}  {used:>9}  "
              f"{'needed' if s.needed else 'spare':6}  {s.text}")


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if days < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of days")
    return days * 86400


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 500M or 2G")
    return int(value * units[unit])


# -- OCI images: store export, store init --from-image -------------------------------------

def _add_image_options(cmds: argparse._SubParsersAction, init: argparse.ArgumentParser,
                       init_src: argparse._MutuallyExclusiveGroup) -> None:
    """``init --from-image`` and the ``export`` subcommand, with skopeo's registry options."""
    init_src.add_argument("--from-image", metavar="IMAGE",
                          help="an OCI image: oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                               "docker://HOST/NAME:TAG or containers-storage:IMAGE; its "
                               "layers become the config's (shared with the store's)")
    _registry_options(init)
    c = cmds.add_parser("export", help="write the current state (or a snapshot) as an OCI "
                                       "image, one layer per store layer, or as one tarball",
                        description="DEST: oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                                    "docker://HOST/NAME:TAG or containers-storage:NAME[:TAG].")
    c.add_argument("--snapshot", metavar="NAME", help="export this snapshot")
    c.add_argument("--tar", metavar="FILE",
                   help="the merged tree as one plain tarball instead (podman export's form)")
    _registry_options(c)
    c.add_argument("dest", metavar="DEST", nargs="?")


def _registry_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--tls-verify", default="true", choices=("true", "false"),
                   help="require HTTPS and valid certificates (default true; false for a "
                        "plain-HTTP registry such as one on 127.0.0.1)")
    c.add_argument("--authfile", metavar="FILE",
                   help="registry credentials (default: the containers auth.json)")


def _cmd_image(store: LayerStore, args: argparse.Namespace) -> int:
    access = Access(tls_verify=args.tls_verify == "true", authfile=args.authfile)
    if args.store_command == "init":
        result = store.config(args.config).init_image(args.from_image, access)
        for line in result.notes:
            print(f"overlayfuse: {line}", file=sys.stderr)
        print(f"overlayfuse: {result.line('imported', 'from ' + args.from_image)}",
              file=sys.stderr)
        return 0
    if (args.tar is None) == (args.dest is None):
        raise OverlayfuseError("export takes DEST or --tar FILE")
    if args.tar is not None:
        n = export_tar(store, args.config, args.tar, snapshot=args.snapshot)
        print(f"overlayfuse: wrote {n} entries to {args.tar}", file=sys.stderr)
        return 0
    result = export_image(store, args.config, args.dest, snapshot=args.snapshot, access=access)
    print(f"overlayfuse: {result.line('exported', 'to ' + args.dest)}", file=sys.stderr)
    return 0
