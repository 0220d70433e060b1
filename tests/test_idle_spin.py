"""The idle request loop's spin (``-o spin=US``, tools/pyfuse3/request-loop-spin.patch).

Between a reply and the caller's next request the daemon polls the FUSE fd for up to the
window instead of sleeping at once.  What must hold whatever the window: a mount that sits
idle costs no CPU (the spin follows only a short wait, and ends).  Every other test runs with
the default window (200 us), so the rest of the behaviour is checked there.  With stock pyfuse3
there is no spin and this holds trivially.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mounts import make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root here")

WINDOW_US = 10000  # the largest window the option takes


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
