"""A progress line for long store work, on a terminal only (quiet in scripts and logs)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``update(text)`` rewrites one stderr line at most 5 times a second; ``done`` clears it."""

    def __init__(self, what: str, enabled: bool | None = None) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        sys.stderr.write(f"\r\033[K{self.what}: {text}")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False
