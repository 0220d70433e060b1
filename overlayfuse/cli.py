"""The ``overlayfuse`` command: subcommands, and the fuse-overlayfs / mount.fuse3 drop-in forms.

``overlayfuse mount|umount|check|run ...`` is the command for people.  Container engines run
their "mount program" as ``overlayfuse -o lowerdir=..,upperdir=..,workdir=.. MERGED`` and
mount.fuse3 (``mount -t fuse.overlayfuse``, /etc/fstab) as ``overlayfuse SOURCE MNT -o OPTS``;
both always mean the FUSE backend and return once the mount is ready.  Every failure the user
can act on ends as one line ``overlayfuse: <message>`` on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from typing import Sequence

from .errors import OverlayfuseError
from .fuseopts import log_ignored
from .backends.fuse import fuse_mount_options
from .spec import OverlaySpec, last_wins, parse_options, split_unescaped
from .validate import check_fuse_prerequisites, mount_at, validate

log = logging.getLogger("overlayfuse")

SUBCOMMANDS = ("mount", "umount", "check", "run", "store", "build")
BACKENDS = ("auto", "kernel", "fuse")
USAGE_ERROR = 2

# per-mount flags of mount(2), applied to a kernel overlay by a bind remount
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_NOATIME = 32, 4096, 1024
KERNEL_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                "noatime": MS_NOATIME}


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("overlayfuse")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "0.1.0"


# -- options for the backends -----------------------------------------------------------------

def kernel_mount_flags(other: Sequence[str]) -> int:
    """mount(2) per-mount flags for the harmless options given (last of each pair wins)."""
    flags = 0
    for item in last_wins(other).values():
        flags |= KERNEL_FLAGS.get(item, 0)
    return flags


# -- backends ---------------------------------------------------------------------------------

def choose_backend(spec: OverlaySpec, requested: str) -> tuple[str, str]:
    """The backend (``kernel`` or ``fuse``) for ``overlayfuse mount`` and the reason, for -v.

    The probe decides (:func:`overlayfuse.backends.choose.choose`); an explicit backend that
    cannot work is an OverlayfuseError with the probe's reason, never a fallback.
    """
    from .backends.choose import choose
    chosen, why = choose(spec, "mount", requested)
    return chosen.name, why


def mount_fuse_backend(spec: OverlaySpec, mnt: str, other: Sequence[str], *,
                       foreground: bool, debug: bool) -> int:
    """Start the FUSE daemon (or serve in the foreground); 0 once mounted / unmounted."""
    check_fuse_prerequisites()
    from .fusefs.daemon import mount_fuse  # the daemon pulls in pyfuse3 and trio: only now
    pid = mount_fuse(spec, mnt, foreground=foreground,
                     fuse_options=fuse_mount_options(other, os.geteuid() == 0), debug=debug)
    if not foreground:
        log.info("mounted %s (daemon pid %d)", mnt, pid)
    return 0


def mount_kernel_backend(spec: OverlaySpec, mnt: str, other: Sequence[str]) -> int:
    """Mount the kernel's overlayfs on ``mnt`` with mount(2), then apply ro/nodev/... flags."""
    from . import sysmount
    from .backends.kernel import mount_spec, refusal
    try:
        mount_spec(spec, mnt)
    except OSError as e:
        raise refusal("kernel overlayfs", mnt, spec, e) from None
    flags = kernel_mount_flags(other)
    if flags:
        try:
            sysmount.mount(None, mnt, None, MS_REMOUNT | MS_BIND | flags, None)
        except OSError as e:
            sysmount.umount2(mnt)
            raise OverlayfuseError(f"cannot set mount flags on {mnt}: {e.strerror}") from None
    log.info("mounted kernel overlay on %s", mnt)
    return 0


def do_mount(options: Sequence[str], mountpoint: str, *, backend: str = "fuse",
             foreground: bool = False, debug: bool = False) -> int:
    """Parse, validate (before anything is created), choose the backend and mount."""
    spec, other = parse_options(",".join(options), cwd=os.getcwd())
    mnt = os.path.realpath(mountpoint)
    from .probe import clear_dead_fuse
    if clear_dead_fuse(mnt):  # a killed daemon's mount: no manual fusermount3 -u needed
        log.info("took down the dead FUSE mount at %s", mnt)
    validate(spec, mnt)
    chosen, why = choose_backend(spec, backend)
    log.info("%s", why)
    if chosen == "fuse":
        from .backends.fuse import transport_note
        log.info("fuse transport: %s", transport_note(spec))
    log_ignored(other)
    if chosen == "kernel":
        return mount_kernel_backend(spec, mnt, other)
    return mount_fuse_backend(spec, mnt, other, foreground=foreground, debug=debug)


def do_remount(options: Sequence[str], mountpoint: str) -> int:
    """``mount -o remount,ro MNT`` on an overlayfuse mount: mount.fuse3 runs the drop-in form
    with ``remount`` among the options.  The mount's flags change (ro/rw, nosuid, ...); the
    daemon and its layers stay as they are, so nothing but the flags is read."""
    mnt = os.path.realpath(mountpoint)
    if mount_at(mnt) is None:
        raise OverlayfuseError(f"{mnt} is not mounted")
    if os.geteuid() != 0:
        raise OverlayfuseError("remount needs root (mount(2) with MS_REMOUNT)")
    from . import sysmount
    items = [i for o in options for i in o.split(",") if i]
    try:
        sysmount.mount(None, mnt, None, MS_REMOUNT | kernel_mount_flags(items), None)
    except OSError as e:
        raise OverlayfuseError(f"cannot remount {mnt}: {e.strerror}") from None
    return 0


def do_umount(mountpoint: str) -> int:
    """Unmount an overlayfuse (FUSE) or kernel overlay mount at ``mountpoint``."""
    mnt = os.path.realpath(mountpoint)
    mounted = mount_at(mnt)
    if mounted is None:
        raise OverlayfuseError(f"{mnt} is not mounted")
    fstype, _source = mounted
    if fstype == "overlay":
        from . import sysmount
        try:
            sysmount.umount2(mnt)
        except OSError as e:
            raise OverlayfuseError(f"cannot unmount {mnt}: {e.strerror}") from None
        return 0
    if not fstype.startswith("fuse."):
        raise OverlayfuseError(f"{mnt} is a {fstype} mount, not an overlay")
    if shutil.which("fusermount3") is None:
        if os.geteuid() != 0:
            raise OverlayfuseError("fusermount3 not found on PATH: it unmounts a FUSE mount")
        from . import sysmount
        try:
            sysmount.umount2(mnt)
        except OSError as e:
            raise OverlayfuseError(f"cannot unmount {mnt}: {e.strerror}") from None
        return 0
    r = subprocess.run(["fusermount3", "-u", mnt], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise OverlayfuseError(f"cannot unmount {mnt}: "
                               + (lines[-1].removeprefix("fusermount3: ") if lines
                                  else f"fusermount3 exited with {r.returncode}"))
    return 0


# -- argument parsing -------------------------------------------------------------------------

def _setup_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="overlayfuse: %(message)s", stream=sys.stderr)


def wants_debug(options: Sequence[str]) -> bool:
    """``-o debug`` (libfuse's and fuse-overlayfs' spelling of ``-d``)."""
    return "debug" in split_unescaped(",".join(options), ",")


def cmd_mount(args: argparse.Namespace) -> int:
    debug = args.debug or wants_debug(args.options)
    _setup_logging(args.verbose, debug)
    return do_mount(args.options, args.mountpoint, backend=args.backend,
                    foreground=args.foreground, debug=debug)


def cmd_umount(args: argparse.Namespace) -> int:
    return do_umount(args.mountpoint)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the subcommand form."""
    p = argparse.ArgumentParser(
        prog="overlayfuse",
        description="Overlay filesystems: the kernel's overlayfs where allowed, FUSE elsewhere. "
                    "Also usable as fuse-overlayfs: overlayfuse -o lowerdir=...,upperdir=...,"
                    "workdir=... MERGED")
    p.add_argument("--version", action="version", version=f"overlayfuse {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser("mount", help="mount an overlay (returns once it is ready)",
                       description="Mount the layers of -o on MNT; the daemon of the FUSE "
                                   "backend stays in the background unless -f.")
    m.add_argument("--backend", choices=BACKENDS, default="auto")
    m.add_argument("-o", dest="options", action="append", required=True, metavar="OPTS",
                   help="lowerdir=L1:L2[,upperdir=U,workdir=W][,volatile][,...] "
                        "(may be repeated)")
    m.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    m.add_argument("-v", "--verbose", action="store_true", help="say which backend and why")
    m.add_argument("-d", "--debug", action="store_true", help="debug logging (FUSE requests)")
    m.add_argument("mountpoint", metavar="MNT")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount an overlay mounted by overlayfuse",
                       description="Unmount MNT: fusermount3 -u for a FUSE mount, umount2 for "
                                   "a kernel overlay.")
    u.add_argument("mountpoint", metavar="MNT")
    u.set_defaults(func=cmd_umount)

    from .probe import add_check_parser
    from .run import add_run_parser
    from .store.cli import add_store_parsers
    add_check_parser(sub)
    add_run_parser(sub)
    add_store_parsers(sub)
    return p


def build_dropin_parser() -> argparse.ArgumentParser:
    """fuse-overlayfs's and mount.fuse3's calling convention."""
    p = argparse.ArgumentParser(
        prog="overlayfuse",
        usage="overlayfuse [-f] [-d] -o OPTS [SOURCE] MNT",
        description="fuse-overlayfs compatible form (always the FUSE backend; returns once "
                    "mounted, the daemon stays in the background). Commands: "
                    + ", ".join(SUBCOMMANDS) + " (overlayfuse COMMAND -h).")
    p.add_argument("--version", "-V", action="version", version=f"overlayfuse {version()}")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", dest="debug", action="store_true", help="debug output (implies -f)")
    p.add_argument("-s", dest="single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MNT")
    return p


def dropin_main(argv: Sequence[str]) -> int:
    """``overlayfuse -o OPTS MERGED`` and ``overlayfuse SOURCE MNT -o OPTS``: FUSE, daemonized."""
    parser = build_dropin_parser()
    args = parser.parse_intermixed_args(argv)
    if len(args.paths) > 2:
        parser.error("expected [SOURCE] MNT")
    if not args.options:
        parser.error("-o lowerdir=... is required")
    debug = args.debug or wants_debug(args.options)
    _setup_logging(False, debug)
    if "remount" in ",".join(args.options).split(","):
        return do_remount(args.options, args.paths[-1])
    # libfuse's convention (fuse-overlayfs follows it): -d and -o debug mean debug in the
    # foreground
    return do_mount(args.options, args.paths[-1], backend="fuse",
                    foreground=args.foreground or debug, debug=debug)


def is_dropin(argv: Sequence[str]) -> bool:
    """The fuse-overlayfs / mount.fuse3 form: no subcommand first (``-o``, a SOURCE, ...)."""
    if not argv:
        return False
    first = argv[0]
    return first not in SUBCOMMANDS and first not in ("-h", "--help", "--version")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``overlayfuse`` and ``python -m overlayfuse``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if is_dropin(argv):
            return dropin_main(argv)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except OverlayfuseError as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"overlayfuse: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overlayfuse: interrupted", file=sys.stderr)
        return 1
    except OSError as e:  # a system failure outside our checks: still one line, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"overlayfuse: {e.strerror or e}{where}", file=sys.stderr)
        return 1
