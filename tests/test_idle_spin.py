"""The idle request loop's spin (``-o spin=US``, tools/pyfuse3/request-loop-spin.patch).

Between a reply and the caller's next request the daemon polls the FUSE fd for up to the
window instead of sleeping at once.  What must hold whatever the window: a mount that sits
idle costs no CPU (the spin follows only a short wait, and ends), and the daemon's trio timers
fire on time (the spin ends at the next deadline).  Every other test runs with the default
window (200 us), so the rest of the behaviour is checked there.  With stock pyfuse3 there is
no spin and the patched-only tests skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounts import make_layers, overlayfuse_mount, unmount
from overlayfuse.fusefs import transport

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root here")

WINDOW_US = 10000  # the largest window the option takes
needs_spin = pytest.mark.skipif(not transport.has_idle_spin(), reason="stock pyfuse3: no spin")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("spin", [200, WINDOW_US])
def test_an_idle_mount_costs_no_cpu(tmp_path: Path, spin: int) -> None:
    layers = make_layers(tmp_path, 1)
    for i in range(200):
        (layers.lowers[0] / f"f{i}").write_bytes(b"x")
    with overlayfuse_mount(layers.lowers, layers.upper, layers.work, layers.mnt,
                           extra=[f"spin={spin}"]) as dm:
        for _ in range(3):
            # a burst of requests in a row (the spin pays and is on), then nothing
            for i in range(200):
                os.lstat(layers.mnt / f"f{i}")
                (layers.mnt / f"n{i}").write_bytes(b"y")
                os.unlink(layers.mnt / f"n{i}")
            time.sleep(0.2)
            before = _cpu_seconds(dm.pid)
            time.sleep(2)
            idle = _cpu_seconds(dm.pid) - before
            assert idle < 0.1, f"the daemon used {idle:.2f} s of CPU in 2 s without a request"


# A bare pyfuse3 filesystem in a child process: a thread sends bursts of lookups with gaps
# between them, so the loop spins after each burst, while a trio task sleeps 2 ms again and
# again and prints how late its worst wake-up was.  The window (200 ms) is far longer than
# the sleeps: a spin that ignores trio's next deadline delays a timer by up to the gap.
_TIMER_CHILD = r"""
import os, sys, threading, time, trio, pyfuse3
mnt = sys.argv[1]
pyfuse3.init(pyfuse3.Operations(), mnt, ["fsname=ovf-spin-test"])
pyfuse3.set_idle_spin(0.2)
late, stop = [], threading.Event()
def caller():
    while not stop.is_set():
        for _ in range(50):
            try:
                os.stat(os.path.join(mnt, "x"))
            except OSError:
                pass
        time.sleep(0.1)
async def timer(th):
    await trio.sleep(0.1)
    for _ in range(60):
        t = trio.current_time()
        await trio.sleep(0.002)
        late.append(trio.current_time() - t - 0.002)
    stop.set()
    await trio.to_thread.run_sync(th.join)
    pyfuse3.terminate()
async def main():
    th = threading.Thread(target=caller)
    th.start()
    async with trio.open_nursery() as n:
        n.start_soon(timer, th)
        await pyfuse3.main()
trio.run(main)
pyfuse3.close(unmount=True)
print(max(late))
"""


@needs_spin
def test_a_spin_ends_at_the_next_trio_deadline(tmp_path: Path) -> None:
    """The daemon's trio timers (and stock pyfuse3's bounded waits) must fire on time while
    the loop spins: the spin stops at the nearer deadline, and the sleep after it waits
    only what is left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        done = subprocess.run([sys.executable, "-c", _TIMER_CHILD, str(mnt)],
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        unmount(mnt)
    assert done.returncode == 0, done.stderr
    worst = float(done.stdout)
    assert worst < 0.02, f"a 2 ms trio sleep woke {worst * 1000:.1f} ms late during a spin"


@needs_spin
@pytest.mark.parametrize("extra, want", [("", "idle spin 200 us"),
                                         (",spin=0", "no idle spin (spin=0)"),
                                         (",spin=750", "idle spin 750 us")])
def test_mount_v_names_the_window(tmp_path: Path, extra: str, want: str) -> None:
    layers = make_layers(tmp_path, 1)
    r = subprocess.run(["overlayfuse", "mount", "-v", "--backend", "fuse", "-o",
                        f"lowerdir={layers.lowers[0]},upperdir={layers.upper},"
                        f"workdir={layers.work}{extra}", str(layers.mnt)],
                       capture_output=True, text=True, check=False)
    try:
        assert r.returncode == 0, r.stderr
        line = [x for x in r.stderr.splitlines() if "fuse transport:" in x]
        assert line and line[0].endswith(want), r.stderr
    finally:
        unmount(layers.mnt)
