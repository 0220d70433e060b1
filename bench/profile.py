"""Where does the overlayfuse daemon spend its time? ``python -m bench.profile WORKLOAD...``

Mounts overlayfuse on the workload's layers exactly as the benchmark does, attaches py-spy
(``pip install py-spy``) to the daemon for the timed part only, and prints the functions with
the most samples (own time and inclusive). The collapsed stacks are kept (``--out``) for a
flame graph (e.g. ``py-spy``'s own SVG, speedscope or flamegraph.pl).
"""
from __future__ import annotations

import argparse
import collections
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import systems
from bench.layers import DEFAULT_CACHE
from bench.runner import DEFAULT_OUT, UsageError, select_workloads
from bench.sizes import FULL, QUICK
from bench.workloads import Ctx

log = logging.getLogger("bench.profile")


def _py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise UsageError("py-spy is not installed (pip install py-spy)")
    return exe


def top_functions(collapsed: Path, n: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]],
                                                    int]:
    """(own-time top, inclusive top, total samples) from py-spy's collapsed ("raw") output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        # "func (file.py:123)" -> "func (file.py)": a function's lines summed together
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return own.most_common(n), incl.most_common(n), total


def profile(name: str, quick: bool, out: Path, cache: Path, rate: int, top: int) -> None:
    sizes = QUICK if quick else FULL
    found = select_workloads(name, sizes)
    if len(found) != 1:
        raise UsageError(f"{name!r} names {len(found)} workloads; give exactly one")
    w = found[0]
    fx = w.fixture(cache, sizes)
    system = systems.ALL["overlayfuse"]
    why = system.available()
    if why:
        raise UsageError(f"overlayfuse is not available: {why}")
    rundir = cache / "runs" / f"profile-{w.name}"
    shutil.rmtree(rundir, ignore_errors=True)
    for d in ("upper", "work", "mnt"):
        (rundir / d).mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with system.mount(fx.lowers, fx.merged, rundir, w.mutating, 1200.0) as m:
            ctx = Ctx(m.root, fx, sizes, cache, 1200.0)
            for mode in w.modes:
                if mode == "cold":
                    systems.drop_caches()
                collapsed = out / f"profile-{w.name}-{mode}.txt"
                spy = subprocess.Popen([_py_spy(), "record", "--pid", str(m.pid), "--rate",
                                        str(rate), "--format", "raw", "--output", str(collapsed),
                                        "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # let py-spy attach
                t0 = time.perf_counter()
                w.fn(ctx, mode)
                dt = time.perf_counter() - t0
                spy.send_signal(signal.SIGINT)
                _, err = spy.communicate(timeout=60)
                if not collapsed.exists():
                    raise UsageError(f"py-spy wrote no profile: {err.decode().strip()[-300:]}")
                own, incl, total = top_functions(collapsed, top)
                print(f"\n== {w.name}/{mode}: {dt:.3f}s, {total} samples at {rate} Hz "
                      f"(daemon busy ~{total / rate:.2f}s), stacks in {collapsed}")
                print("-- own time --")
                for f, c in own:
                    print(f"{100 * c / max(total, 1):5.1f}%  {f}")
                print("-- inclusive --")
                for f, c in incl:
                    print(f"{100 * c / max(total, 1):5.1f}%  {f}")
    finally:
        for mp in systems.mounts_under(rundir):
            systems.force_unmount(mp)
        if not systems.mounts_under(rundir):
            shutil.rmtree(rundir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("workloads", nargs="+", help="workload names (see python -m bench --list)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")
    try:
        for name in args.workloads:
            profile(name, args.quick, args.out.resolve(), args.cache.resolve(), args.rate,
                    args.top)
    except UsageError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
