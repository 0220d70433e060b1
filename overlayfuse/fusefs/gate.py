"""The request gate: a layer switch waits until no request is half done, and holds new ones.

Every handler passes the gate (``ops._errors``).  A switch closes it: requests that arrive
wait at the entry, the running ones finish (their replies go out as usual), and once none is
left the switch has the daemon to itself.  A request is thus applied wholly to the layers
before the switch or wholly to those after it, never half to each.
"""
from __future__ import annotations

import trio


class Gate:
    """Counts the requests inside; ``closed`` is set while a switch runs."""

    def __init__(self) -> None:
        self.active = 0
        self._reopened: trio.Event | None = None  # set when the running switch is over
        self._idle: trio.Event | None = None

    async def enter(self) -> None:
        while self._reopened is not None:
            await self._reopened.wait()
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def close(self) -> None:
        """Hold new requests back and return once the running ones are done."""
        while self._reopened is not None:  # one switch at a time
            await self._reopened.wait()
        self._reopened = trio.Event()
        if self.active:
            self._idle = trio.Event()
            try:
                await self._idle.wait()
            except BaseException:
                self.open()
                raise
            finally:
                self._idle = None

    def open(self) -> None:
        event, self._reopened = self._reopened, None
        if event is not None:
            event.set()
