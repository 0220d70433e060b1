"""The upper layer's record of what it holds (``format.FEATURES_XATTR`` on its root dir).

Choosing a backend for a set of layers must not walk them, yet a kernel mount with
``userxattr`` cannot follow a redirect or a hard-link index entry, and a kernel before 6.7
cannot read an xattr whiteout.  So the daemon announces each such marker in the record before
it writes the first one, synced (unless the mount is volatile) so that a crash leaves a record
that claims too much rather than too little.  The first change of any kind also writes the
record, empty if need be: its namespace says which xattrs the layer's markers use, which a
reader needs even when the layer holds nothing special.
"""
from __future__ import annotations

import logging
import os

from .. import format as fmt

log = logging.getLogger(__name__)


class UpperRecord:
    """The record on one upper root; ``note`` is cheap once a feature is in it."""

    def __init__(self, root_fd: int, prefix: bytes, durable: bool) -> None:
        self._root_fd = root_fd
        self._prefix = prefix
        self._durable = durable
        self.features: frozenset[str] | None = None  # None: not read (or written) yet

    def note(self, *features: str) -> None:
        """Make sure the record exists and lists ``features``, durably, before returning.

        The bare record (no features) is a courtesy to readers: where the upper cannot hold it
        (no xattr support) the write it precedes goes on.  A feature that cannot be recorded
        stops the write that needed it (its marker could not be stored either).
        """
        if self.features is not None and all(f in self.features for f in features):
            return
        try:
            self._write(features)
        except OSError as e:
            if features:
                raise
            log.debug("cannot record the upper's namespace: %s", os.strerror(e.errno or 0))
            self.features = frozenset()

    def xwhiteout(self) -> None:
        """``note(XWHITEOUT)``, in the form ``format.make_whiteout`` calls back."""
        self.note(fmt.XWHITEOUT)

    def _write(self, features: tuple[str, ...]) -> None:
        self.features = fmt.add_features(self._root_fd, self._prefix, set(features),
                                         self._durable)
