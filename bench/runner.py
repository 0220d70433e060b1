"""Run the benchmark: every workload on every system, systems alternating run by run.

Order: for each workload, for each repetition, each system once (A B C A B C ...), so drift on
a shared machine hits every system alike. Each run gets a fresh upper/work dir and a fresh
mount; ``cold`` measurements follow ``sync; echo 3 > /proc/sys/vm/drop_caches``. A failing run is
recorded (and shown in the report) and the benchmark goes on; Ctrl-C or SIGTERM stops it, every
mount is undone on the way out and the partial results are still written.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import asuser, report, systems
from bench.asuser import User
from bench.layers import DEFAULT_CACHE, Fixture
from bench.sizes import FULL, QUICK, Sizes
from bench.workloads import Ctx, Workload, all_workloads

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"


class UsageError(Exception):
    """Bad command-line input: reported as one line."""


@dataclass
class Record:
    """One timed pass: a workload mode on one system in one repetition."""

    workload: str
    mode: str
    system: str
    rep: int
    seconds: float | None
    cpu: float | None = None
    rss_kb: int | None = None
    error: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Benchmark overlayfuse against kernel overlayfs, "
                                            "fuse-overlayfs and a plain directory.")
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (CI)")
    p.add_argument("--systems", default="",
                   help=f"comma list out of {','.join(systems.ALL)} (default: all available)")
    p.add_argument("--workloads", default="",
                   help="comma list of workload names or globs, e.g. 'stat-tree,lookup-*'")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per system (default 5, --quick 2)")
    p.add_argument("--no-cap", action="store_true",
                   help="full runs: ignore the lower repetition caps of the expensive workloads")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for results.json, chart.png, table.md (default {DEFAULT_OUT})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"where the layers are built once and reused (default {DEFAULT_CACHE})")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before a hung run is killed (default 1200, --quick 120)")
    p.add_argument("--as-user", metavar="NAME|UID",
                   help="mount the FUSE systems as this normal user (fusermount3) and run the "
                        "workloads as it; the kernel overlay (root's) stays as the limit")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def select_systems(spec: str) -> tuple[list[systems.System], dict[str, str]]:
    """The systems to run and, for the others, why not."""
    names = ([x.strip() for x in spec.split(",") if x.strip()] if spec
             else [n for n, s in systems.ALL.items() if s.default])
    unknown = [n for n in names if n not in systems.ALL]
    if unknown:
        raise UsageError(f"unknown system {unknown[0]!r} (choose from {', '.join(systems.ALL)})")
    chosen, skipped = [], {}
    for n in names:
        why = systems.ALL[n].available()
        if why is None:
            chosen.append(systems.ALL[n])
        elif spec:
            raise UsageError(f"system {n} is not available here: {why}")
        else:
            skipped[n] = why
    if not chosen:
        raise UsageError("no system is available")
    return chosen, skipped


def select_workloads(spec: str, sizes: Sizes) -> list[Workload]:
    every = all_workloads(sizes)
    if not spec:
        return every
    pats = [x.strip() for x in spec.split(",") if x.strip()]
    for pat in pats:
        if not any(fnmatch.fnmatchcase(w.name, pat) for w in every):
            raise UsageError(f"no workload matches {pat!r} (see --list)")
    return [w for w in every if any(fnmatch.fnmatchcase(w.name, p) for p in pats)]


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per run otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, text: str, advance: bool = False) -> None:
        if advance:
            self.done += 1
        el = time.monotonic() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0.0
        line = (f"[{self.done}/{self.total} {el / 60:4.1f}m eta {eta / 60:4.1f}m] {text}")
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line[:150])
        elif advance:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_one(system: systems.System, w: Workload, fx: Fixture, rep: int, sizes: Sizes,
            cache: Path, timeout: float, seq: int, user: User | None = None) -> list[Record]:
    """Mount *system* fresh on *fx*, run *w*'s modes in order, unmount; one Record per mode.
    With *user*, the system is mounted for that user and the workload runs as it."""
    rundir = cache / "runs" / f"{os.getpid()}-{seq}-{system.name}"
    for d in ("upper", "work", "mnt"):
        (rundir / d).mkdir(parents=True)
    out: list[Record] = []
    try:
        with system.mount(fx.lowers, fx.merged, rundir, w.mutating, timeout, user) as m:
            ctx = Ctx(m.root, fx, sizes, cache, timeout)
            for mode in w.modes:
                if mode == "cold":
                    systems.drop_caches()
                cpu0 = systems.daemon_cpu(m.pid)
                if user is None:
                    t0 = time.perf_counter()
                    w.fn(ctx, mode)
                    dt = time.perf_counter() - t0
                else:
                    dt = asuser.timed_as(user, w.fn, ctx, mode)
                cpu1 = systems.daemon_cpu(m.pid)
                cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                out.append(Record(w.name, mode, system.name, rep, dt, cpu,
                                  systems.daemon_hwm_kb(m.pid)))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 -- a failing system is a result, not a crash
        msg = " ".join([f"{type(e).__name__}: {e}", *getattr(e, "__notes__", [])])
        log.debug("%s %s rep %d failed", system.name, w.name, rep, exc_info=True)
        done = {r.mode for r in out}
        out += [Record(w.name, mode, system.name, rep, None, error=msg[:500])
                for mode in w.modes if mode not in done]
    finally:
        left = systems.mounts_under(rundir)
        for mp in left:
            systems.force_unmount(mp)
        if systems.mounts_under(rundir):
            log.error("mounts left under %s; not removing it", rundir)
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    return out


def _meta(args: argparse.Namespace, sizes: Sizes, chosen: list[systems.System],
          skipped: dict[str, str], wl: list[Workload], reps: int) -> dict[str, Any]:
    def cmd(argv: list[str]) -> str:
        with contextlib.suppress(OSError):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) \
                else ""
        return ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick, "reps": reps,
        "root": os.geteuid() == 0, "cold_drops_caches": os.geteuid() == 0,
        "systems": [s.name for s in chosen], "skipped_systems": skipped,
        "fuse_overlayfs_version": cmd([systems.FUSE_OVERLAYFS, "--version"]),
        "overlayfuse_rev": cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "sizes": asdict(sizes),
        "workloads": {w.name: {"what": w.what, "modes": list(w.modes), "group": w.group,
                               "ops": w.ops, "mutating": w.mutating,
                               "reps": _reps(w, reps, args), **w.extra} for w in wl},
    }


def _reps(w: Workload, reps: int, args: argparse.Namespace) -> int:
    if args.quick or args.no_cap or w.max_reps is None:
        return reps
    return min(reps, w.max_reps)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    if reps < 1:
        raise UsageError("--reps must be at least 1")
    timeout = args.timeout or (120.0 if args.quick else 1200.0)
    wl = select_workloads(args.workloads, sizes)
    if args.list:
        for w in wl:
            print(f"{w.name:18} {'/'.join(w.modes):11} {w.what}")
        return 0
    user = None
    if args.as_user:
        try:
            user = asuser.resolve(args.as_user)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if os.geteuid() != 0:
            raise UsageError("--as-user runs as root (it mounts the kernel overlay and "
                             "switches to the user)")
        if not args.systems:
            args.systems = "kernel,fuse-overlayfs,overlayfuse"
    chosen, skipped = select_systems(args.systems)
    for name, why in skipped.items():
        log.warning("skipping %s: %s", name, why)
    cache = args.cache.resolve()
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, sizes, chosen, skipped, wl, reps)
    meta["as_user"] = user.name if user else None

    records: list[Record] = []
    interrupted = False
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and mounts must go anyway
    old = {sig: signal.signal(sig, _on_sigterm)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    total = sum(_reps(w, reps, args) * len(chosen) for w in wl)
    prog = Progress(total)
    opened = contextlib.ExitStack()
    try:
        if user is not None:
            opened.enter_context(asuser.fuse_device_for_users())
        fixtures: dict[str, Fixture] = {}
        for w in wl:
            prog.show(f"preparing layers for {w.name} (built once, cached in {cache})")
            fixtures[w.name] = w.fixture(cache, sizes)
            if user is not None:
                asuser.own_layers(user, fixtures[w.name].lowers)
        seq = 0
        for w in wl:
            for rep in range(_reps(w, reps, args)):
                for s in chosen:
                    seq += 1
                    prog.show(f"{w.name} on {s.name}, rep {rep + 1}")
                    recs = run_one(s, w, fixtures[w.name], rep, sizes, cache, timeout, seq,
                                   user)
                    records += recs
                    last = ", ".join(f"{r.mode} {r.seconds:.3f}s" if r.error is None
                                     else f"{r.mode} FAILED" for r in recs)
                    prog.show(f"{w.name} on {s.name}, rep {rep + 1}: {last}", advance=True)
                    for r in recs:
                        if r.error and r.mode == recs[-1].mode:
                            log.warning("%s on %s failed: %s", w.name, s.name, r.error)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: writing the partial results")
    finally:
        prog.end()
        opened.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for mp in systems.mounts_under(cache / "runs"):
            systems.force_unmount(mp)
    meta["interrupted"] = interrupted
    meta["elapsed_s"] = round(time.monotonic() - prog.t0, 1)
    result = report.build(meta, [asdict(r) for r in records])
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    table = report.table_markdown(result)
    (out_dir / "table.md").write_text(table)
    report.chart(result, out_dir / "chart.png")
    print(table)
    print(f"\nresults: {out_dir}/results.json, table.md, chart.png")
    if interrupted:
        return 130
    return 1 if any(r.error for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="bench: %(message)s")
    try:
        return run(args)
    except UsageError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
