"""``overlayfuse run``: a command with its working directory in a merged tree, then nothing left.

vagga's ``_run --writable`` done with an overlay instead of a copy: the lowers stay untouched,
the throwaway upper is removed afterwards (or kept with ``--keep-upper``), the mount vanishes
whatever happens, and the command's exit status (128+signal for a signal) becomes ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .backends.base import SETUP_FAILED, CommandError
from .backends.choose import BACKEND_NAMES, choose
from .errors import OverlayfuseError
from .fuseopts import ignored_notes
from .probe import rmtree_force, signals_unwind
from .spec import OverlaySpec, parse_options
from .validate import validate_layers, validate_mountpoint

log = logging.getLogger(__name__)


def run(spec: OverlaySpec | None, argv: Sequence[str], *, backend: str = "auto",
        cwd: str | None = None, mountpoint: str | None = None, writable: bool = False,
        keep_upper: str | None = None, env: dict[str, str] | None = None,
        map_root: bool = False, verbose: bool = False) -> int:
    """Run ``argv`` in the merged tree of ``spec``; return its exit status.

    ``spec`` None means the current directory as the only lower.  ``writable`` adds a throwaway
    upper and work dir (removed afterwards); ``keep_upper`` keeps the changes in that dir
    instead (its work dir is made beside it, on the same filesystem, and removed).  ``cwd`` is
    relative to the merged root.  Raises OverlayfuseError when the overlay cannot be set up
    (CommandError, with ``status`` 126/127, when the command cannot be started).
    """
    if spec is None:
        spec = OverlaySpec(lowerdirs=(os.getcwd(),))
    if keep_upper is not None:
        writable = True
    if writable and spec.upperdir is not None:
        raise OverlayfuseError("--writable/--keep-upper make their own upper dir; "
                               "do not also give upperdir=")
    with signals_unwind(), _writable_layers(spec, writable, keep_upper) as full:
        if mountpoint is not None:
            validate_mountpoint(full, mountpoint)
        chosen, why = choose(full, "run", backend)
        if verbose:
            print(f"overlayfuse: {why}", file=sys.stderr)
            if chosen.name == "fuse":
                from .backends.fuse import transport_note
                print(f"overlayfuse: fuse transport: {transport_note(full)}", file=sys.stderr)
        return chosen.run(full, argv, cwd, mountpoint=mountpoint, env=env, map_root=map_root)


@contextmanager
def _writable_layers(spec: OverlaySpec, writable: bool,
                     keep_upper: str | None) -> Iterator[OverlaySpec]:
    """Add the throwaway (or kept) upper and its work dir; remove what is throwaway after."""
    if not writable:
        yield spec
        return
    remove: list[str] = []
    try:
        if keep_upper is None:
            from .backends.base import run_dir
            base = tempfile.mkdtemp(prefix="overlayfuse-writable-", dir=_scratch_base(run_dir()))
            remove.append(base)
            upper, work = os.path.join(base, "upper"), os.path.join(base, "work")
            os.mkdir(upper)
            os.mkdir(work)
        else:
            upper = os.path.abspath(keep_upper)
            os.makedirs(upper, exist_ok=True)
            parent = os.path.dirname(upper)
            try:
                work = tempfile.mkdtemp(prefix=f".{os.path.basename(upper)}.work-", dir=parent)
            except OSError as e:
                raise OverlayfuseError(f"cannot make a work dir beside {upper} (it must be on "
                                       f"the same filesystem): {e.strerror}") from None
            remove.append(work)
            if os.stat(work).st_dev != os.stat(upper).st_dev:
                raise OverlayfuseError(f"{upper} is a mount point: its work dir in {parent} "
                                       "would be on another filesystem")
        yield dataclasses.replace(spec, upperdir=upper, workdir=work)
    except OSError as e:
        raise OverlayfuseError(f"cannot prepare the writable layer: {e}") from None
    finally:
        for d in remove:
            rmtree_force(d)


def _scratch_base(default: str) -> str:
    """$TMPDIR wins for the throwaway upper: it holds data, not just a mount point."""
    return os.environ.get("TMPDIR") or default


def _parse_spec(text: str, verbose: bool = False) -> OverlaySpec:
    """The spec of ``-o``: the project's one option grammar, layers checked before anything;
    with ``verbose``, a note for each fuse-overlayfs option that is accepted and ignored."""
    spec, harmless = parse_options(text, cwd=os.getcwd())
    validate_layers(spec)
    if verbose:
        for note in ignored_notes(harmless):
            print(f"overlayfuse: {note}", file=sys.stderr)
    return spec


# -- command line ----------------------------------------------------------------------------

def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``overlayfuse run``."""
    p = subparsers.add_parser(
        "run", help="run a command with its working directory in a merged tree",
        description="Run CMD with its working directory at the merged tree of the layers "
                    "(default: the current dir as the only lower) and OVERLAYFUSE_MERGED set; "
                    "nothing stays mounted afterwards.")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES)
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="lowerdir=L1:L2[,upperdir=U,workdir=W][,...]")
    p.add_argument("--writable", action="store_true",
                   help="a throwaway upper layer, removed afterwards")
    p.add_argument("--keep-upper", metavar="DIR",
                   help="keep the changes in DIR (implies --writable)")
    p.add_argument("--mountpoint", metavar="DIR", help="mount here instead of a temp dir")
    p.add_argument("--map-root", action="store_true",
                   help="kernel-userns: run as root inside the user namespace")
    p.add_argument("-v", "--verbose", action="store_true", help="say which backend and why")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    """Entry for ``overlayfuse run``: CMD's exit status, 125 for our own failure."""
    def call(argv: list[str]) -> int:
        spec = _parse_spec(args.options, args.verbose) if args.options else None
        return run(spec, argv, backend=args.backend, mountpoint=args.mountpoint,
                   writable=args.writable, keep_upper=args.keep_upper,
                   map_root=args.map_root, verbose=args.verbose)
    return command_status(args.command, "overlayfuse run [...] -- CMD [ARGS]", call)


def command_status(command: Sequence[str], usage: str, call: Callable[[list[str]], int]) -> int:
    """What ``run`` and ``store run`` share: the command after ``--``, its exit status from
    ``call``, 126/127 when it cannot start, 125 for our own failure, 2 for no command."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(f"overlayfuse: run needs a command: {usage}", file=sys.stderr)
        return 2
    try:
        return call(argv)
    except CommandError as e:
        print(f"overlayfuse: {e}", file=sys.stderr)
        return e.status
    except OverlayfuseError as e:
        print(f"overlayfuse: {e}", file=sys.stderr)
        return SETUP_FAILED
