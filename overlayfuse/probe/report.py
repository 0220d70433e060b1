"""The probe's answer: facts plus a trial per backend, the verdicts drawn from them, and their
text (``overlayfuse check``) and JSON forms (``--json`` and the cache).

One object that every consumer reads: the backends ask it for verdicts, the cache stores its
dict form, the command line prints it.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING
from dataclasses import asdict, dataclass, field

from .facts import Facts

if TYPE_CHECKING:
    from ..spec import OverlaySpec

BACKENDS: tuple[str, ...] = ("kernel", "kernel-userns", "fuse")

USERNS_MOUNT_REASON = ("a mount inside a private user namespace is invisible to your other "
                       "processes, so kernel-userns serves only `run`")


@dataclass
class Trial:
    """One backend's trial: did the overlay work, why (not), and how long it took."""

    ok: bool
    reason: str
    seconds: float = 0.0


@dataclass
class Report:
    """The probe's answer: facts plus a trial per backend."""

    facts: Facts
    trials: dict[str, Trial]
    cached: bool = False
    probed_at: float = 0.0
    seconds: float = 0.0
    # set by ``consider``, never cached: what one overlay's layers hold, and per backend why it
    # would show them otherwise than their writer did
    layers: str = ""
    wrong_tree: dict[str, str] = field(default_factory=dict)

    def consider(self, spec: "OverlaySpec") -> "Report":
        """Fold what ``spec``'s layers hold (survey.py) into the verdicts."""
        from ..survey import describe, refusal, survey
        held = survey(spec)
        self.layers = describe(held)
        self.wrong_tree = {}
        for b in BACKENDS:
            why = refusal(spec, b, held)
            if why:
                self.wrong_tree[b] = why
        return self

    def verdict(self, backend: str, purpose: str = "mount") -> "Verdict":
        """Can ``backend`` serve ``purpose`` ("mount" or "run") here (for the layers
        ``consider`` was given)?"""
        from ..backends.base import Verdict
        trial = self.trials.get(backend)
        if trial is None:
            return Verdict(False, f"{backend} was not probed")
        if backend == "kernel-userns" and purpose == "mount":
            return Verdict(False, USERNS_MOUNT_REASON)
        if trial.ok and backend in self.wrong_tree:
            return Verdict(False, self.wrong_tree[backend])
        return Verdict(trial.ok, trial.reason)

    def can_mount(self) -> bool:
        return any(self.verdict(b, "mount").ok for b in BACKENDS)

    def preferred(self, purpose: str) -> str | None:
        """The backend ``auto`` picks for ``purpose``, or None when none works."""
        order = ("kernel", "fuse") if purpose == "mount" else BACKENDS
        for b in order:
            if self.verdict(b, purpose).ok:
                return b
        return None

    def to_dict(self) -> dict:
        return {
            "kernel": {"release": self.facts.kernel_release,
                       "version": self.facts.kernel_version},
            "uid": self.facts.uid,
            "user": self.facts.user,
            "directory": self.facts.directory,
            "filesystem": {"type": self.facts.fs_type, "magic": self.facts.fs_magic,
                           "dev": self.facts.dev},
            "features": {"mknod_whiteout": self.facts.mknod_whiteout,
                         "trusted_xattr": self.facts.trusted_xattr,
                         "user_xattr": self.facts.user_xattr,
                         "d_type": self.facts.d_type},
            "feature_notes": self.facts.notes,
            "backends": {
                b: {"mount": asdict(self.verdict(b, "mount")),
                    "run": asdict(self.verdict(b, "run")),
                    "trial": asdict(t)}
                for b, t in self.trials.items()},
            "choice": {"mount": self.preferred("mount"), "run": self.preferred("run")},
            **({"layers": {"holds": self.layers, "wrong_tree": self.wrong_tree}}
               if self.layers else {}),
            "can_mount": self.can_mount(),
            "cached": self.cached,
            "probed_at": self.probed_at,
            "probe_seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        facts = Facts(
            kernel_release=d["kernel"]["release"], kernel_version=d["kernel"]["version"],
            uid=d["uid"], user=d["user"], directory=d["directory"],
            fs_type=d["filesystem"]["type"], fs_magic=d["filesystem"]["magic"],
            dev=d["filesystem"]["dev"], notes=d.get("feature_notes", {}),
            **d["features"])
        trials = {b: Trial(**v["trial"]) for b, v in d["backends"].items()}
        return cls(facts, trials, cached=d.get("cached", False),
                   probed_at=d.get("probed_at", 0.0), seconds=d.get("probe_seconds", 0.0))

    def format_text(self) -> str:
        """The human report of ``overlayfuse check``."""
        f = self.facts

        def yn(ok: bool, note: str | None = None) -> str:
            return ("yes" if ok else "no") + (f" ({note})" if note and not ok else "")

        lines = [
            f"kernel:     {f.kernel_release} {f.kernel_version}",
            f"user:       {f.user} (uid {f.uid})",
            f"directory:  {f.directory}",
            f"filesystem: {f.fs_type} (magic {f.fs_magic}, dev {f.dev})",
            f"  whiteouts (mknod c 0 0): {yn(f.mknod_whiteout, f.notes.get('mknod'))}",
            f"  trusted.* xattrs:        {yn(f.trusted_xattr, f.notes.get('trusted_xattr'))}",
            f"  user.* xattrs:           {yn(f.user_xattr, f.notes.get('user_xattr'))}",
            f"  d_type:                  {yn(f.d_type, f.notes.get('d_type'))}",
            "backends:",
        ]
        for b in BACKENDS:
            t = self.trials.get(b)
            if t is None:
                continue
            if b == "kernel-userns" and t.ok:
                state = "supported for run only"
            else:
                state = "supported" if t.ok else "NOT supported"
            lines.append(f"  {b:<14} {state}: {t.reason}")
        if self.layers:
            lines.append(f"layers:     {self.layers}")
            for b, why in self.wrong_tree.items():
                lines.append(f"  {b:<14} {why}")
        m, r = self.preferred("mount"), self.preferred("run")
        lines.append(f"auto chooses: mount -> {m or 'nothing works'}, "
                     f"run -> {r or 'nothing works'}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.probed_at))
        how = f"cached result from {when}" if self.cached else "probed now"
        lines.append(f"probe: {how}, took {self.seconds * 1000:.0f} ms")
        return "\n".join(lines)
