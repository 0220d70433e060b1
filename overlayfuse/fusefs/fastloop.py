"""A cheaper wait for the next FUSE request than pyfuse3's stock one.

pyfuse3 waits for every single request with ``trio.lowlevel.wait_readable``: an epoll
registration, a trip through trio's scheduler and an epoll_wait, even when the next request is
already queued, which it usually is under load.  Measured here, that wait was the largest part
of the daemon's per-request cost.  We hand pyfuse3 a ``trio`` whose ``wait_readable`` first
polls the fd without blocking and, when a request is waiting, only passes a cheap checkpoint
(so thread completions and signals still get their turn); otherwise it waits as before.
pyfuse3 supports swapping its ``trio`` module (its asyncio mode does the same).
"""
from __future__ import annotations

import select
import types

import pyfuse3
import trio


def _fast_lowlevel() -> types.SimpleNamespace:
    lowlevel = trio.lowlevel
    poller = select.poll()
    registered: set[int] = set()

    async def wait_readable(fd: int) -> None:
        if fd not in registered:
            poller.register(fd, select.POLLIN)
            registered.add(fd)
        if poller.poll(0):
            await lowlevel.checkpoint()
            return
        await lowlevel.wait_readable(fd)

    proxy = types.SimpleNamespace(**{name: getattr(lowlevel, name) for name in dir(lowlevel)
                                     if not name.startswith("__")})
    proxy.wait_readable = wait_readable
    return proxy


def install() -> None:
    """Make pyfuse3 use the polling wait (call before pyfuse3.main)."""
    fake = types.SimpleNamespace(**{name: getattr(trio, name) for name in dir(trio)
                                    if not name.startswith("__")})
    fake.lowlevel = _fast_lowlevel()
    pyfuse3.trio = fake
