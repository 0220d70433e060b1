"""What a set of layers holds, and which backend can show it as the writer left it.

Every backend writes the kernel's format, but not every reader can read all of it: a kernel
mount with ``userxattr`` (a normal user's, and kernel-userns always) refuses ``redirect_dir``
and ``index``, so it shows a renamed lower directory as missing and a copied-up hard link as two
files; a root kernel mount reads only ``trusted.overlay.*`` unless told ``userxattr``; the FUSE
backend does not read metacopy.  Layers say what they hold on their root dirs (the kernel's own
``overlay.uuid``/``origin`` name the namespace, our ``ovf.features`` record lists the rest: see
fusefs/record.py and ``record_kernel_features`` below), so one listxattr per layer answers,
never a walk of the tree.  ``refusal`` says why a backend would show another tree; ``adapt``
gives the spec the options a backend needs to show the same one.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, replace

from . import format as fmt
from .spec import OverlaySpec

METACOPY = "metacopy"  # data left in a lower, the upper holding metadata (kernel metacopy=on)
_NAMESPACES = {"trusted": fmt.TRUSTED_PREFIX, "user": fmt.USER_PREFIX}
_KERNEL_PARAMS = "/sys/module/overlay/parameters"


@dataclass(frozen=True)
class Survey:
    """What the layers of one spec hold.

    ``namespace`` is the xattr namespace their markers use ("trusted", "user"; None when no
    layer root shows any); ``mixed`` names layers whose markers use the other one.
    ``features`` maps each feature (format.REDIRECT, INDEX, XWHITEOUT, METACOPY) to the first
    layer found holding it.  INDEX counts for the upper only: a frozen layer's index stays with
    its old work dir, and every backend reads the names it left the same way.
    """

    namespace: str | None = None
    features: dict[str, str] = field(default_factory=dict)
    mixed: tuple[str, ...] = ()

    def holds(self, feature: str) -> bool:
        return feature in self.features


def _layer_marks(path: str) -> tuple[set[str], frozenset[str]]:
    """(namespaces whose overlay xattrs are on the layer root, its recorded features)."""
    try:
        names = [n.encode("utf-8", "surrogateescape") for n in os.listxattr(path)]
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EACCES, errno.EPERM, errno.ENOENT):
            return set(), frozenset()
        raise
    spaces: set[str] = set()
    features: frozenset[str] = frozenset()
    for ns, prefix in _NAMESPACES.items():
        if any(n.startswith(prefix) for n in names):
            spaces.add(ns)
            if prefix + fmt.FEATURES_XATTR in names:
                try:
                    features |= fmt.decode_features(os.getxattr(path, prefix + fmt.FEATURES_XATTR))
                except OSError:
                    pass
    return spaces, features


def _index_in_use(workdir: str) -> bool:
    """A hard-link index entry in the work dir, whoever wrote it (the kernel writes no record)."""
    try:
        with os.scandir(os.path.join(workdir, "index")) as it:
            return any(True for _ in it)
    except OSError:
        return False


def survey(spec: OverlaySpec) -> Survey:
    """Read the layer roots of ``spec`` (upper first) and its work dir's index."""
    namespace: str | None = None
    mixed: list[str] = []
    found: dict[str, str] = {}
    layers = ([spec.upperdir] if spec.upperdir else []) + list(spec.lowerdirs)
    for path in layers:
        spaces, features = _layer_marks(path)
        if len(spaces) > 1 or (spaces and namespace is not None and namespace not in spaces):
            mixed.append(path)
        elif spaces and namespace is None:
            namespace = next(iter(spaces))
        for feature in features:
            if feature == fmt.INDEX and path != spec.upperdir:
                continue
            found.setdefault(feature, path)
    if spec.upperdir and spec.workdir and fmt.INDEX not in found and _index_in_use(spec.workdir):
        found[fmt.INDEX] = spec.upperdir
    return Survey(namespace, found, tuple(mixed))


def describe(s: Survey) -> str:
    """One line for ``check``: the namespace and what the layers hold, and where."""
    ns = f"{s.namespace}.overlay.* markers" if s.namespace else "no overlay markers on the roots"
    if s.mixed:
        ns += f" (and the other namespace's on {', '.join(s.mixed)})"
    if not s.features:
        return ns + "; nothing that any backend cannot read"
    return ns + "; " + ", ".join(f"{f} (in {where})" for f, where in sorted(s.features.items()))


# -- who reads what ---------------------------------------------------------------------------

def _as_root() -> bool:
    return os.geteuid() == 0


def _reads_namespace(spec: OverlaySpec, backend: str, s: Survey) -> str:
    """The namespace ``backend`` reads once adapted (``adapt`` adds userxattr where needed)."""
    if backend == "kernel-userns" or not _as_root():
        return "user"
    if spec.userxattr or s.namespace == "user":  # asked for, or added by ``adapt``
        return "user"
    return "trusted"


def _kernel_param(name: str) -> bool | None:
    try:
        with open(os.path.join(_KERNEL_PARAMS, name)) as f:
            return f.read().strip() == "Y"
    except OSError:
        return None


def _kernel_release() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def refusal(spec: OverlaySpec, backend: str, s: Survey | None = None) -> str | None:
    """Why ``backend`` would show these layers otherwise than their writer did, or None."""
    why = _other_tree(spec, backend, survey(spec) if s is None else s)
    return f"would show another tree than these layers hold: {why}" if why else None


def _other_tree(spec: OverlaySpec, backend: str, s: Survey) -> str | None:
    if s.mixed:
        return ("the layers mix trusted.overlay.* and user.overlay.* markers (" + s.mixed[0]
                + "); every backend reads only one namespace per mount")
    reads = _reads_namespace(spec, backend, s)
    if s.namespace is not None and s.namespace != reads:
        return (f"the layers' markers are {s.namespace}.overlay.* (written "
                + ("by root" if s.namespace == "trusted" else "without root")
                + f"), and {backend} would read {reads}.overlay.* here")
    if backend == "fuse":
        if s.holds(METACOPY):
            return f"{s.features[METACOPY]} holds metacopy files, which the FUSE backend cannot read"
        return None
    who = "kernel overlayfs with userxattr" if reads == "user" else "kernel overlayfs"
    if s.holds(fmt.REDIRECT):
        if reads == "user":
            return (f"{s.features[fmt.REDIRECT]} holds redirects of renamed directories, which "
                    f"{who} cannot follow (the kernel refuses redirect_dir with userxattr)")
        if spec.option("redirect_dir") == "nofollow" or (
                spec.option("redirect_dir") == "off" and _kernel_param("redirect_always_follow") is False):
            return (f"{s.features[fmt.REDIRECT]} holds redirects of renamed directories, which "
                    f"redirect_dir={spec.option('redirect_dir')} does not follow")
    if s.holds(fmt.INDEX):
        if reads == "user":
            return (f"{s.features[fmt.INDEX]} has hard links kept through the index, which {who} "
                    "cannot read (the kernel refuses index=on with userxattr)")
        if spec.option("index") == "off":
            return (f"{s.features[fmt.INDEX]} has hard links kept through the index, which "
                    "index=off does not read")
    if s.holds(fmt.XWHITEOUT) and _kernel_release() < (6, 7):
        return (f"{s.features[fmt.XWHITEOUT]} holds xattr whiteouts, which kernels before 6.7 "
                "do not read")
    return None


def adapt(spec: OverlaySpec, backend: str, s: Survey | None = None) -> OverlaySpec:
    """``spec`` with the options ``backend`` needs to read the layers as written: userxattr
    for user.overlay.* markers as root, and for the kernel as root, index=on where the upper
    has an index and redirect_dir=follow where the kernel would not follow by default."""
    s = survey(spec) if s is None else s
    extra: list[tuple[str, str | None]] = []
    if _as_root() and s.namespace == "user" and not spec.userxattr \
            and backend != "kernel-userns":
        extra.append(("userxattr", None))
    if backend == "kernel" and _as_root() and _reads_namespace(spec, backend, s) == "trusted":
        if s.holds(fmt.INDEX) and spec.option("index") is None and not _kernel_param("index"):
            extra.append(("index", "on"))
        if s.holds(fmt.REDIRECT) and spec.option("redirect_dir") is None \
                and not (_kernel_param("redirect_dir") or _kernel_param("redirect_always_follow")):
            extra.append(("redirect_dir", "follow"))
    return replace(spec, options=spec.options + tuple(extra)) if extra else spec


def record_kernel_features(spec: OverlaySpec, userxattr: bool) -> None:
    """Before a kernel mount writes to the upper, record on it what the options let the kernel
    write there (redirects, an index, metacopy), in the namespace it will use: the kernel keeps
    no such record of its own, and a later reader must not have to walk the tree to know."""
    if spec.upperdir is None or userxattr:
        return  # with userxattr the kernel refuses all three: nothing it writes needs a word
    enabled = {feature for option, feature in (("redirect_dir", fmt.REDIRECT),
                                               ("index", fmt.INDEX), ("metacopy", METACOPY))
               if spec.option(option) == "on"
               or spec.option(option) is None and _kernel_param(option)}
    if not enabled:
        return
    prefix = fmt.TRUSTED_PREFIX if _as_root() else fmt.USER_PREFIX
    fd = os.open(spec.upperdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fmt.add_features(fd, prefix, enabled, durable=not spec.volatile)
    except OSError:
        pass  # no xattrs on the upper's filesystem: the kernel will refuse it anyway
    finally:
        os.close(fd)
