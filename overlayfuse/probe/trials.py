"""The trial mounts: per backend, a tiny real overlay in the scratch dir, used through the
merged dir, then its traces checked in the upper in the shared on-disk format.

The trial overlay has two lowers, an upper and a work dir; deleting a lower file must leave a
whiteout in the upper, and a written file must land there.  The kernel trials run in a forked
child with a private mount namespace, so a killed probe never leaves an overlay mounted; the
FUSE trial mounts in the caller's namespace (as the FUSE backend does) and is unmounted in a
``finally``.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from typing import Callable, Sequence

from .. import format as fmt
from .. import sysmount
from ..errors import OverlayfuseError
from ..spec import OverlaySpec
from .child import in_child
from .facts import Facts, base_facts, fs_facts
from .report import Report, Trial
from .scratch import make_scratch, remove_scratch, remove_stale_scratch
from .signals import deferred_signals
from .unmount import unmount_fuse

log = logging.getLogger(__name__)


def _make_lowers(scratch: str) -> list[str]:
    """Two lowers: ``top`` only above, ``both`` in each (the upper one wins), ``gone`` below."""
    l1, l2 = os.path.join(scratch, "l1"), os.path.join(scratch, "l2")
    os.mkdir(l1)
    os.mkdir(l2)
    for path, data in ((f"{l1}/top", "top"), (f"{l1}/both", "upper"),
                       (f"{l2}/both", "lower"), (f"{l2}/gone", "gone")):
        with open(path, "w") as f:
            f.write(data)
    # let every user read the lowers: a uid-mapped trial must see them
    for p in (scratch, l1, l2):
        os.chmod(p, 0o755)
    return [l1, l2]


def _trial_dirs(scratch: str, name: str) -> tuple[str, str, str]:
    base = os.path.join(scratch, name)
    os.mkdir(base)
    dirs = tuple(os.path.join(base, d) for d in ("upper", "work", "merged"))
    for d in dirs:
        os.mkdir(d)
    return dirs  # type: ignore[return-value]


def exercise(merged: str) -> None:
    """Use the trial overlay: listing, lookup order, delete a lower file, write a new one."""
    names = sorted(os.listdir(merged))
    if names != ["both", "gone", "top"]:
        raise AssertionError(f"merged listing is {names}, expected both, gone, top")
    with open(os.path.join(merged, "both")) as f:
        if f.read() != "upper":
            raise AssertionError("the upper lower dir does not hide the one below")
    os.unlink(os.path.join(merged, "gone"))
    with open(os.path.join(merged, "new"), "w") as f:
        f.write("new")
    names = sorted(os.listdir(merged))
    if names != ["both", "new", "top"]:
        raise AssertionError(f"after delete and write the listing is {names}")


def _xattr_whiteout(directory: str, name: str, st: os.stat_result) -> bool:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        return fmt.is_xattr_whiteout(fd, os.fsencode(name), st)
    finally:
        os.close(fd)


def _verify_upper(upper: str, lowers: Sequence[str],
                  allow_xattr_whiteout: bool) -> tuple[bool, str]:
    """Check the trial's traces in the upper dir, in the shared on-disk format."""
    try:
        st = os.lstat(os.path.join(upper, "gone"))
    except FileNotFoundError:
        return False, "deleting a lower file left no whiteout in the upper dir"
    if fmt.is_whiteout_stat(st):
        wh = "whiteout char 0/0"
    elif allow_xattr_whiteout and _xattr_whiteout(upper, "gone", st):
        wh = "whiteout as an xattr-marked file (mknod refused)"
    else:
        return False, "deleting a lower file left no whiteout in the upper dir"
    try:
        with open(os.path.join(upper, "new")) as f:
            if f.read() != "new":
                return False, "a file written through the overlay has other data in the upper"
    except FileNotFoundError:
        return False, "a file written through the overlay did not land in the upper dir"
    if not os.path.exists(os.path.join(lowers[1], "gone")):
        return False, "deleting through the overlay removed the lower file itself"
    return True, wh


def _mount_and_exercise(lowers: list[str], upper: str, work: str, merged: str, who: str,
                        facts: Facts, userxattr: bool = False) -> None:
    """In a kernel trial's child, once in its namespace: mount, use, unmount; a refusal says why."""
    sysmount.make_rprivate()
    try:
        sysmount.mount_overlay(lowers, upper, work, merged, userxattr=userxattr)
    except OSError as e:
        raise OverlayfuseError(_refusal(e, who, facts)) from None
    exercise(merged)
    sysmount.umount2(merged)


def _upper_verdict(upper: str, lowers: Sequence[str], reason: str,
                   allow_xattr_whiteout: bool) -> tuple[bool, str]:
    """A trial that ran through: its verdict is what its traces in the upper say."""
    ok, how = _verify_upper(upper, lowers, allow_xattr_whiteout)
    return ok, (f"{reason} (trial: {how}, copy-up into the upper)" if ok else how)


def _trial_kernel(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    upper, work, merged = _trial_dirs(scratch, "kernel")

    def child() -> str:
        try:
            # a private mount namespace: same privilege check as the caller's, but a probe
            # killed mid-trial can never leave an overlay behind
            sysmount.unshare(sysmount.CLONE_NEWNS)
        except PermissionError:
            if facts.uid == 0:
                raise OverlayfuseError("mounting is not permitted: this root process lacks "
                                       "CAP_SYS_ADMIN") from None
            raise OverlayfuseError(
                f"mounting needs root (CAP_SYS_ADMIN); you are {facts.user}") from None
        _mount_and_exercise(lowers, upper, work, merged, "kernel overlayfs", facts)
        return "mount(2) of overlayfs works here"

    ok, reason = in_child(child)
    if not ok:
        return False, reason
    return _upper_verdict(upper, lowers, reason, allow_xattr_whiteout=False)


def _trial_userns(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    upper, work, merged = _trial_dirs(scratch, "userns")
    uid, gid = os.geteuid(), os.getegid()

    def child() -> str:
        try:
            sysmount.unshare(sysmount.CLONE_NEWUSER | sysmount.CLONE_NEWNS)
        except OSError as e:
            raise OverlayfuseError(
                "cannot create a user namespace: unshare(CLONE_NEWUSER) failed: "
                + os.strerror(e.errno or 0)
                + (" (user.max_user_namespaces is 0?)" if e.errno == errno.ENOSPC else "")
            ) from None
        sysmount.map_ids(uid, uid, gid, gid)
        _mount_and_exercise(lowers, upper, work, merged, "kernel overlayfs in a user namespace",
                            facts, userxattr=True)
        return "overlayfs mounts in a new user+mount namespace with userxattr"

    ok, reason = in_child(child)
    if not ok:
        return False, reason
    return _upper_verdict(upper, lowers, reason, allow_xattr_whiteout=False)


def fuse_preconditions() -> str | None:
    """Why a FUSE mount cannot work here without even trying (None: it may)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (fuse module not loaded?)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "cannot open /dev/fuse: permission denied"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "fusermount3 not found: an unprivileged FUSE mount needs it"
    return None


def _trial_fuse(scratch: str, lowers: list[str], facts: Facts) -> tuple[bool, str]:
    why_not = fuse_preconditions()
    if why_not:
        return False, why_not
    try:
        from ..fusefs.daemon import mount_fuse
    except Exception as e:  # ImportError, or the daemon module failing to load
        return False, f"the FUSE daemon cannot load: {e}"
    upper, work, merged = _trial_dirs(scratch, "fuse")
    spec = OverlaySpec(lowerdirs=tuple(lowers), upperdir=upper, workdir=work)
    pid = None
    try:
        with deferred_signals():
            pid = mount_fuse(spec, merged, with_caller=True)
    except OverlayfuseError as e:
        return False, f"the FUSE mount failed: {e}"
    except BaseException:
        if pid is not None:
            unmount_fuse(merged, pid, wait=False)
        raise
    try:
        ok, reason = in_child(lambda: exercise(merged) or "the FUSE daemon mounts and serves")
    finally:
        # wait: the daemon must be gone before the scratch dir (its work dir) is removed
        unmount_fuse(merged, pid)
    if not ok:
        return False, f"the FUSE trial failed: {reason}"
    return _upper_verdict(upper, lowers, reason, allow_xattr_whiteout=True)


def _refusal(e: OSError, who: str, facts: Facts) -> str:
    text = re.sub(r"^(fsconfig [\w+]+|fsopen|fsmount|move_mount|mount): ", "",
                  e.strerror or str(e))
    text = re.sub(r"^overlay(fs)?: ", "", text)
    if e.errno == errno.EPERM:
        return f"{who} refused: permission denied ({text})"
    if text == os.strerror(e.errno or 0):
        text += " (the kernel gave no reason; dmesg may say more)"
    return f"{who} refused the trial mount on {facts.fs_type}: {text}"


_TRIALS: dict[str, Callable[[str, list[str], Facts], tuple[bool, str]]] = {
    "kernel": _trial_kernel, "kernel-userns": _trial_userns, "fuse": _trial_fuse}


def run_trials(directory: str, backends: Sequence[str]) -> Report:
    """The uncached probe: facts, then each backend's trial, in a scratch dir in ``directory``."""
    remove_stale_scratch(directory)
    facts = base_facts(directory)
    trials: dict[str, Trial] = {}
    try:
        scratch = make_scratch(directory)
    except OSError as e:
        why = f"cannot create a scratch dir in {directory}: {e.strerror}"
        return Report(facts, {b: Trial(False, why) for b in backends})
    try:
        fs_facts(scratch, facts)
        lowers = _make_lowers(scratch)
        for b in backends:
            t0 = time.monotonic()
            try:
                ok, reason = _TRIALS[b](scratch, lowers, facts)
            except OverlayfuseError as e:
                ok, reason = False, str(e)
            except OSError as e:
                ok, reason = False, f"trial failed: {e}"
            # name the user's directory, not the scratch dir that is gone after the probe
            reason = re.sub(re.escape(scratch) + r"(/[\w-]+)*", directory, reason)
            trials[b] = Trial(ok, reason, round(time.monotonic() - t0, 4))
            log.debug("probe %s: %s (%s)", b, ok, reason)
    finally:
        remove_scratch(scratch)
    return Report(facts, trials)
