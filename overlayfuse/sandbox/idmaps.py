"""Which IDs a sandboxed command has: the host's (root), or a user namespace's map.

As a normal user, root inside is the user outside, and the user's subordinate ranges
(/etc/subuid, /etc/subgid) give every other ID through the setuid helpers newuidmap/newgidmap
(Debian's ``uidmap``), as podman and vagga do: so chown, useradd and package managers work.
Without ranges or helpers only the user's own ID can be mapped (the kernel allows that much):
``IdPlan.note`` says so and what to add.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

from ..errors import OverlayfuseError
from ..sysmount import CLONE_NEWUSER, map_ids, unshare

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
IdMode = Literal["auto", "subids", "single"]


@dataclass(frozen=True)
class IdRange:
    """IDs ``inside .. inside+count-1`` in the namespace are ``outside ..`` on the host."""

    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdPlan:
    """How the sandbox maps IDs: ``host`` (root: no user namespace), ``subids`` or ``single``."""

    mode: Literal["host", "subids", "single"]
    uids: tuple[IdRange, ...] = ()
    gids: tuple[IdRange, ...] = ()
    note: str = ""
    by_root: bool = False  # root maps a user's IDs: root writes the maps, setgroups allowed


def subordinate_ranges(path: str, name: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) of the lines ``NAME:START:COUNT`` (or ``UID:...``) of ``path`` for the
    user, in file order; malformed lines are skipped, as newuidmap skips them."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)) and \
                fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) > 0:
            out.append((int(fields[1]), int(fields[2])))
    return out


def _chain(own: int, ranges: list[tuple[int, int]]) -> tuple[IdRange, ...]:
    """0 -> ``own``, then the ranges one after the other from inside ID 1."""
    out, nxt = [IdRange(0, own, 1)], 1
    for start, count in ranges:
        out.append(IdRange(nxt, start, count))
        nxt += count
    return tuple(out)


def _free_range(size: int = 65536) -> int:
    """A start for a new range of ``size`` that overlaps nobody's in either file."""
    taken = []
    for path in (SUBUID, SUBGID):
        try:
            with open(path) as f:
                for line in f:
                    fields = line.strip().split(":")
                    if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                        taken.append((int(fields[1]), int(fields[1]) + int(fields[2])))
        except OSError:
            pass
    start = 100000
    while any(start < end and begin < start + size for begin, end in taken):
        start += size
    return start


def plan_ids(idmap: IdMode = "auto", owner: tuple[int, int] | None = None) -> IdPlan:
    """The map for this process: ``auto`` takes the subordinate ranges when there are some (and
    the helpers), else one ID; ``subids`` insists on the ranges; ``single`` maps one ID.

    ``owner`` (uid, gid) matters to root only: root working on a tree a normal user owns gets
    that user's map (0 is the user, then the user's ranges), so what it writes there is the
    user's to remove; root writes such maps itself, no helper needed.
    """
    uid, gid = os.geteuid(), os.getegid()
    as_root = uid == 0
    if as_root:
        if owner is None or owner[0] == 0:
            return IdPlan("host", note="running as root: no user namespace, the host's IDs")
        uid, gid = owner
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    single = IdPlan("single", (IdRange(0, uid, 1),), (IdRange(0, gid, 1),), by_root=as_root)
    if idmap == "single":
        return IdPlan("single", single.uids, single.gids,
                      f"user namespace with one ID (0 is uid {uid}), as asked", as_root)
    subuids, subgids = subordinate_ranges(SUBUID, name, uid), subordinate_ranges(SUBGID, name, uid)
    helpers = [] if as_root else [h for h in ("newuidmap", "newgidmap") if not shutil.which(h)]
    why = []
    if helpers:
        why.append(f"{' and '.join(helpers)} missing (Debian's package uidmap has them)")
    for path, got in ((SUBUID, subuids), (SUBGID, subgids)):
        if not got:
            why.append(f"no range for {name} in {path}")
    if not why:
        note = (f"user namespace: 0 is uid {uid}, 1-{sum(c for _, c in subuids)} are "
                f"{_spans(subuids)} ({SUBUID}), gids {_spans(subgids)} ({SUBGID})")
        return IdPlan("subids", _chain(uid, subuids), _chain(gid, subgids), note, as_root)
    start = _free_range()
    fix = (f"as root: usermod --add-subuids {start}-{start + 65535} --add-subgids "
           f"{start}-{start + 65535} {name}")
    text = (f"user namespace with one ID (0 is uid {uid}; chown to any other ID fails): "
            f"{'; '.join(why)}; to map more IDs, {fix}")
    if idmap == "subids":
        raise OverlayfuseError(f"no subordinate IDs to map: {'; '.join(why)}; {fix}")
    return IdPlan("single", single.uids, single.gids, text, as_root)


def _spans(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{s}-{s + c - 1}" for s, c in ranges)


def _write_maps(pid: int, plan: IdPlan) -> None:
    """newuidmap/newgidmap PID ...: run from outside the namespace, as the user (root writes
    the maps itself)."""
    if os.geteuid() == 0:
        for kind, ranges in (("uid_map", plan.uids), ("gid_map", plan.gids)):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write("".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges))
        return
    for helper, ranges in (("newuidmap", plan.uids), ("newgidmap", plan.gids)):
        args = [str(n) for r in ranges for n in (r.inside, r.outside, r.count)]
        r = subprocess.run([helper, str(pid), *args], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or [f"status {r.returncode}"])[-1]
            raise OverlayfuseError(f"{helper} failed: {err}")


def enter_user_namespace(plan: IdPlan) -> None:
    """unshare(CLONE_NEWUSER) and get ``plan``'s maps written (nothing for ``host``).

    Subordinate ranges can only be written from outside: a helper process forked before the
    unshare stays in the old namespace, waits for the go, runs newuidmap/newgidmap on us and
    reports back.  A one-ID map this process writes itself.
    """
    if plan.mode == "host":
        return
    if plan.mode == "single" and not plan.by_root:
        _unshare_user()
        map_ids(0, plan.uids[0].outside, 0, plan.gids[0].outside)
        return
    target = os.getpid()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(err_r)
        code = 1
        try:
            if os.read(go_r, 1) == b"1":
                _write_maps(target, plan)
                code = 0
        except BaseException as e:
            os.write(err_w, str(e).encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(err_w)
    try:
        _unshare_user()
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
        with os.fdopen(err_r, "rb") as f:
            msg = f.read().decode(errors="replace")
        _, status = os.waitpid(helper, 0)
    if msg or status != 0:
        raise OverlayfuseError(msg or "cannot map the IDs: the newuidmap helper failed")
    if plan.by_root:
        # root's host IDs are not in the map it wrote: become its 0 (the tree's owner)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)


def drop_host_groups(plan: IdPlan) -> None:
    """The command starts with no supplementary groups (the host's show as the overflow ID
    inside); only a map written from outside allows setgroups, and the mounts are made
    before, with the groups' access to the host's paths."""
    if plan.mode == "subids" or plan.by_root:
        os.setgroups([])


def _unshare_user() -> None:
    try:
        unshare(CLONE_NEWUSER)
    except OSError as e:
        raise OverlayfuseError("cannot create a user namespace: unshare(CLONE_NEWUSER) "
                               f"failed: {os.strerror(e.errno or 0)}") from None
