"""Run a command in a sandbox: its own namespaces, a given directory as ``/``, nothing left.

The process tree: the caller forks a child that enters the namespaces (user, when not root;
mount, PID, UTS, IPC; network for ``network="none"``) and stays as a relay; its child is the
PID namespace's init, which mounts the root and relays for the command.  When the command ends,
init exits with its status, and the kernel kills whatever the command left in the namespace;
when the caller dies, the relay and so the namespace die with it (SIGKILL).
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

from ..errors import OverlayfuseError
from ..sysmount import make_rprivate, set_pdeathsig, unshare
from ..sysmount.syscalls import (CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID,
                                 CLONE_NEWUTS)
from .idmaps import IdMode, IdPlan, drop_host_groups, enter_user_namespace, plan_ids
from .process import spawn, wait_forwarding
from .rootfs import Bind, build_root, check_tree_path, resolve_in

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


@dataclass(frozen=True)
class Sandbox:
    """What a command runs in.

    ``root`` becomes ``/`` (it may be made by ``prepare``, which runs inside the new user and
    mount namespaces, as the PID namespace's init, before anything is mounted: the place to
    mount an overlay that only that user namespace may mount; a process it leaves running must
    have exec'd, or the caller waits for it to close the inherited report pipe).  ``network``
    is the host's or ``"none"`` (an own namespace with loopback up).  ``cwd`` is a directory
    in the tree.  ``env`` None means a clean one (PATH, HOME=/root, the host's TERM).
    ``idmap`` is for a normal user: ``auto`` (subordinate ranges, else one ID), ``subids`` or
    ``single``; root keeps the host's IDs, unless ``owner`` (uid, gid) names a normal user
    whose tree it is: then root gets that user's map, as the user would.
    """

    root: str
    binds: tuple[Bind, ...] = ()
    network: Literal["host", "none"] = "host"
    cwd: str = "/"
    env: Mapping[str, str] | None = None
    idmap: IdMode = "auto"
    owner: tuple[int, int] | None = None
    prepare: Callable[[], None] | None = field(default=None, compare=False)

    def ids(self) -> IdPlan:
        """The ID map a run would use (reads /etc/subuid and /etc/subgid now)."""
        return plan_ids(self.idmap, self.owner)

    def describe(self) -> str:
        """One line on the IDs a run gets, and what to add when it gets only one."""
        return self.ids().note


def run(sandbox: Sandbox, argv: Sequence[str], setup_only: bool = False) -> int:
    """Run ``argv`` in ``sandbox``; its exit status (128+signal for a signal).  ``setup_only``
    runs no command: the sandbox is made (``prepare`` is the work) and left, status 0.

    OverlayfuseError when the sandbox cannot be set up (nothing changed for bad input);
    CommandError (``status`` 127 not found, 126 not executable) when the command cannot start.
    """
    _check(sandbox)
    plan = sandbox.ids()
    env = dict(sandbox.env) if sandbox.env is not None else clean_env()
    root = os.path.abspath(sandbox.root)
    caller = os.getpid()
    cwd = os.path.normpath(sandbox.cwd)
    pid = spawn(argv, lambda: _workdir(cwd), env, setup=lambda: _enter(sandbox, plan, caller),
                nested=(lambda: _make_root(sandbox, root, plan), lambda: drop_host_groups(plan)),
                setup_only=setup_only)
    return wait_forwarding(pid)


def _check(sandbox: Sandbox) -> None:
    """What can be checked before anything starts."""
    if sandbox.network not in ("host", "none"):
        raise OverlayfuseError(f"network {sandbox.network!r}: expected 'host' or 'none'")
    if sandbox.idmap not in ("auto", "subids", "single"):
        raise OverlayfuseError(f"idmap {sandbox.idmap!r}: expected auto, subids or single")
    check_tree_path(sandbox.cwd, f"working directory {sandbox.cwd}")
    for bind in sandbox.binds:
        bind.check()
    if sandbox.prepare is None and not os.path.isdir(sandbox.root):
        raise OverlayfuseError(f"root {sandbox.root}: not a directory")


def clean_env() -> dict[str, str]:
    """What a command gets when no environment is given: PATH, HOME=/root, the host's TERM."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    return env


def _enter(sandbox: Sandbox, plan: IdPlan, caller: int) -> None:
    """In the relay: the user namespace, then the others (owned by it).  The relay dies with
    its caller, and the namespace with the relay: a killed caller leaves nothing running."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != caller:
        raise OverlayfuseError("the caller is gone")
    enter_user_namespace(plan)
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC
    if sandbox.network == "none":
        flags |= CLONE_NEWNET
    unshare(flags)
    make_rprivate()
    if sandbox.network == "none":
        _loopback_up()


def _loopback_up() -> None:
    """``ip link set lo up`` by ioctl: a fresh network namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH", b"lo", 0).ljust(40, b"\0")  # struct ifreq
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP).ljust(40, b"\0"))


def _make_root(sandbox: Sandbox, root: str, plan: IdPlan) -> None:
    """In the PID namespace's init: ``prepare``, checks against the tree, mounts, pivot_root."""
    if sandbox.prepare is not None:
        sandbox.prepare()
    if not os.path.isdir(root):
        raise OverlayfuseError(f"root {sandbox.root}: not a directory")
    root = os.path.realpath(root)
    # checked before anything is made, unless a bind makes it
    if not any(_under(sandbox.cwd, b.target) for b in sandbox.binds):
        _workdir(sandbox.cwd, root)
    gid5 = plan.mode == "host" or any(r.inside <= 5 < r.inside + r.count for r in plan.gids)
    try:
        build_root(root, sandbox.binds, 5 if gid5 else None)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise OverlayfuseError(f"cannot set up {sandbox.root} as the root:{where}: "
                               f"{e.strerror or e}") from None


def _under(path: str, top: str) -> bool:
    path, top = os.path.normpath(path), os.path.normpath(top)
    return path == top or path.startswith(top.rstrip("/") + "/")


def _workdir(cwd: str, root: str = "/") -> str:
    """``cwd`` if it is a directory in the tree at ``root`` (the command's ``/`` by default)."""
    if not os.path.isdir(resolve_in(root, cwd)):
        raise OverlayfuseError(f"working directory {cwd}: no such directory in the tree")
    return cwd
