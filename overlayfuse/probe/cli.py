"""``overlayfuse check``: the probe's report on the command line, as text or JSON."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import OverlayfuseError
from ..sandbox.idmaps import plan_ids
from ..spec import OverlaySpec
from ..validate import validate_layers
from .api import probe, probe_dir_for


def add_check_parser(subparsers: "argparse._SubParsersAction") -> "argparse.ArgumentParser":
    """``overlayfuse check``."""
    p = subparsers.add_parser(
        "check", help="which backends work here, and why not",
        description="Try each backend (kernel, kernel-userns, fuse) with a tiny real overlay in "
                    "a scratch dir on the filesystem of DIR and say which work and why not.")
    p.add_argument("--upper", metavar="DIR",
                   help="a directory on the filesystem for upper layers (default: the current "
                        "dir, or the temp dir when that is not writable)")
    p.add_argument("-o", dest="options", metavar="OPTS",
                   help="lowerdir=...[,upperdir=U,workdir=W]: also say what these layers hold "
                        "and which backends show them as written (probes on U's filesystem)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--refresh", action="store_true", help="ignore cached verdicts, probe again")
    p.set_defaults(func=cmd_check)
    return p


def cmd_check(args: "argparse.Namespace") -> int:
    """Exit 0 when at least one backend can serve a mount, 1 otherwise."""
    try:
        if args.options:
            spec = OverlaySpec.from_options(args.options)
            validate_layers(spec)
            report = probe(args.upper or probe_dir_for(spec), refresh=args.refresh)
            report.consider(spec)
        else:
            report = probe(args.upper, refresh=args.refresh)
    except OverlayfuseError as e:
        print(f"overlayfuse: {e}", file=sys.stderr)
        return 1
    from ..backends.fuse import transport_note  # the backends sit above the probe: late
    # the caller's own map, read fresh: /etc/subuid changes without the cached probe knowing
    ids = plan_ids().note
    if args.json:
        print(json.dumps({**report.to_dict(), "fuse_transport": transport_note(),
                          "store_run_ids": ids}, indent=2))
    else:
        print(report.format_text())
        print(f"fuse transport: {transport_note()}")
        print(f"store run IDs: {ids}")
    return 0 if report.can_mount() else 1
