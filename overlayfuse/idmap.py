"""Owners as a mount shows them: fuse-overlayfs' ``uidmapping=``/``gidmapping=`` and squashing.

A container engine gives a user-namespaced container an image whose files are owned by the
container's IDs (0 for root) on disk; the mapping shows them under the host IDs the namespace
maps them to, so nothing has to be chowned.  ``uidmapping=DISK:SHOWN:LEN[:DISK2:SHOWN2:LEN2...]``
says: on-disk ID ``DISK + i`` is shown as ``SHOWN + i`` for ``i < LEN`` (fuse-overlayfs' order,
checked against fuse-overlayfs 1.10 on the same layers).  On-disk IDs outside every range are
shown as the overflow ID (65534); a shown ID outside every range has no on-disk ID, so a
chown to it fails with EINVAL (what chown(2) says of an ID it cannot represent) where
fuse-overlayfs silently stores the overflow ID instead.  A new entry made by a caller whose ID
no range maps (the host's root, preparing a container's tree) is owned by the overflow ID on
disk, as with fuse-overlayfs: container engines rely on being able to do that.

``squash_to_root``/``squash_to_uid=``/``squash_to_gid=`` only change what is shown (every
entry owned by that user/group); what is written still goes through the mapping, and a chown
that the upper filesystem refuses is not an error then (fuse-overlayfs' rules).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import OverlayfuseError

ID_LIMIT = 1 << 32   # IDs are 32-bit; 2**32-1 is "no ID" ((uid_t)-1)


def overflow_id(kind: str) -> int:
    """The kernel's overflow ID for ``uid`` or ``gid`` (shown for unmapped IDs), else 65534."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


@dataclass(frozen=True)
class IdRange:
    disk: int
    shown: int
    length: int


@dataclass(frozen=True)
class IdMap:
    """The ranges of one ``uidmapping=``/``gidmapping=``; no ranges means the identity."""

    ranges: tuple[IdRange, ...] = ()

    @classmethod
    def parse(cls, text: str, key: str = "uidmapping") -> "IdMap":
        """Ranges ``A:B:N`` joined by ``:`` (fuse-overlayfs' form), or by ``,`` inside one
        value; empty fields are skipped as fuse-overlayfs does (containers/storage writes
        ``uidmapping=:0:100000:65536``).  OverlayfuseError for anything else, for ranges that
        overflow 32 bits, and for ranges that overlap on either side (an ID must map one way
        only)."""
        fields = [f for f in text.replace(",", ":").split(":") if f]
        if not fields or len(fields) % 3 or not all(f.isdigit() for f in fields):
            raise OverlayfuseError(f"{key}={text}: expected ID:MAPPED-ID:LENGTH[:ID:MAPPED-ID:"
                                   "LENGTH...] with decimal numbers")
        ranges = []
        for i in range(0, len(fields), 3):
            disk, shown, length = (int(f) for f in fields[i:i + 3])
            where = f"{key}={text}: range {disk}:{shown}:{length}"
            if length == 0:
                raise OverlayfuseError(f"{where} is empty")
            if disk + length > ID_LIMIT - 1 or shown + length > ID_LIMIT - 1:
                raise OverlayfuseError(f"{where} goes past the largest ID {ID_LIMIT - 2}")
            ranges.append(IdRange(disk, shown, length))
        for side in ("disk", "shown"):
            spans = sorted((getattr(r, side), getattr(r, side) + r.length) for r in ranges)
            for (_, end), (start, _) in zip(spans, spans[1:]):
                if start < end:
                    raise OverlayfuseError(f"{key}={text}: ranges overlap on the "
                                           f"{'on-disk' if side == 'disk' else 'mapped'} side")
        return cls(tuple(ranges))

    def _translate(self, id_: int, side: str, other: str) -> int | None:
        for r in self.ranges:
            start = getattr(r, side)
            if start <= id_ < start + r.length:
                return getattr(r, other) + id_ - start
        return None

    def shown(self, disk_id: int, overflow: int) -> int:
        """The ID shown for an on-disk ID (``overflow`` when no range holds it)."""
        if not self.ranges:
            return disk_id
        found = self._translate(disk_id, "disk", "shown")
        return overflow if found is None else found

    def disk(self, shown_id: int) -> int | None:
        """The on-disk ID of a shown ID, or None when no range maps to it."""
        return shown_id if not self.ranges else self._translate(shown_id, "shown", "disk")


def parse_id(text: str, key: str) -> int:
    """A single uid/gid option value (``squash_to_uid=1000``)."""
    if not text.isdigit() or int(text) >= ID_LIMIT - 1:
        raise OverlayfuseError(f"{key}={text}: expected a user or group ID (0 to {ID_LIMIT - 2})")
    return int(text)


@dataclass(frozen=True)
class Owners:
    """Everything that turns on-disk owners into shown ones and back, for one mount."""

    uids: IdMap = IdMap()
    gids: IdMap = IdMap()
    squash_uid: int | None = None
    squash_gid: int | None = None
    overflow_uid: int = 65534
    overflow_gid: int = 65534

    @property
    def identity(self) -> bool:
        return (not self.uids.ranges and not self.gids.ranges and self.squash_uid is None
                and self.squash_gid is None)

    @property
    def squashed(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        """(uid, gid) to report for an entry owned by (uid, gid) on disk."""
        return (self.uids.shown(uid, self.overflow_uid) if self.squash_uid is None
                else self.squash_uid,
                self.gids.shown(gid, self.overflow_gid) if self.squash_gid is None
                else self.squash_gid)

    def disk_uid(self, uid: int) -> int | None:
        return self.uids.disk(uid)

    def disk_gid(self, gid: int) -> int | None:
        return self.gids.disk(gid)


def owners_from_options(options: dict[str, str | None]) -> Owners:
    """The owner policy of a spec's FUSE-only options (values already checked by the spec)."""
    squash_root = "squash_to_root" in options
    uid = options.get("squash_to_uid")
    gid = options.get("squash_to_gid")
    return Owners(
        uids=IdMap.parse(options["uidmapping"], "uidmapping") if options.get("uidmapping")
        else IdMap(),
        gids=IdMap.parse(options["gidmapping"], "gidmapping") if options.get("gidmapping")
        else IdMap(),
        squash_uid=int(uid) if uid is not None else 0 if squash_root else None,
        squash_gid=int(gid) if gid is not None else 0 if squash_root else None,
        overflow_uid=overflow_id("uid"), overflow_gid=overflow_id("gid"))
