"""OverlaySpec: what to mount (layers and options), parsed from and formatted to option strings."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OverlaySpec:
    """Layers and overlay options, independent of the backend that mounts them.

    ``lowerdirs`` are absolute paths, topmost first (as in ``lowerdir=``); ``upperdir`` and
    ``workdir`` are both set or both ``None`` (a read-only overlay).
    """

    lowerdirs: tuple[str, ...]
    upperdir: str | None = None
    workdir: str | None = None
    volatile: bool = False
    # overlay options kept as given (redirect_dir, index, xino, metacopy, userxattr, ...)
    options: tuple[tuple[str, str | None], ...] = field(default=())

    @property
    def readonly(self) -> bool:
        return self.upperdir is None
