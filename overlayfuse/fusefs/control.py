"""The daemon's control socket: a store command asks the live mount to switch its layers.

A unix stream socket (mode 0600, made before the daemon serves) at a path the caller chose;
each connection sends one JSON request on one line, with descriptors (the flock'ed layer
locks the daemon is to hold from now on) as SCM_RIGHTS, and gets one JSON line back.  Only
the daemon's own user and root may ask: the socket's mode keeps others from connecting, and
the daemon checks every peer's credentials (SO_PEERCRED) in case the mode was changed.

Requests: ``{"op": "ping"}``; ``{"op": "freeze", "upper": DIR, "work": DIR, "lowers":
[...], "hold": [names of the fds sent], "share": [names]}`` freezes the upper under the new
one (switch.py) once the requests in flight are done, synced (syncfs) before the new upper
takes any write; then the fds are held under their names and the lock named in ``share``
(the old upper's) goes from exclusive to shared.
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass, field

import pyfuse3
import trio

from .overlay import Overlay
from .switch import Prepared, freeze, replace

log = logging.getLogger(__name__)
FAULT_ENV = "OVERLAYFUSE_SWITCH_FAULT"  # tests: the stage at which the daemon SIGKILLs itself
MAX_REQUEST = 1 << 20
MAX_FDS = 16
REFUSED_READ_TIMEOUT = 10.0   # seconds a refused peer has to send its request
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Control:
    """Where the daemon listens, and the lock fds it holds by name (inherited at fork)."""

    path: str
    held: dict[str, int] = field(default_factory=dict)
    sock: socket.socket | None = None

    def listen(self) -> None:
        """Bind before serving, with a umask that leaves nobody else a moment to connect."""
        d, name = os.path.split(self.path)
        dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.unlink(name, dir_fd=dirfd)  # a killed daemon's socket
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                # through the dir's fd: a store's path may be longer than sun_path allows
                sock.bind(f"/proc/self/fd/{dirfd}/{name}")
            finally:
                os.umask(old)
            sock.listen(8)
            self.sock = sock
        finally:
            os.close(dirfd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def peer_allowed(conn: socket.socket) -> tuple[bool, int, int]:
    """(allowed, pid, uid) of the peer: root or the daemon's own user."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return uid in (0, os.geteuid()), pid, uid


async def serve_control(control: Control, ovl: Overlay, gate) -> None:
    """Accept requests until cancelled; one switch runs at a time (the gate's order)."""
    assert control.sock is not None
    listener = trio.socket.from_stdlib_socket(control.sock)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_connection, conn, control, ovl, gate)


async def _connection(conn, control: Control, ovl: Overlay, gate) -> None:
    try:
        await _converse(conn, control, ovl, gate)
    except Exception:  # a bad request must not end the mount
        log.exception("control request failed")


async def _converse(conn, control: Control, ovl: Overlay, gate) -> None:
    with conn:
        allowed, pid, uid = peer_allowed(conn)
        if not allowed:
            log.warning("control request from uid %d (pid %d) refused", uid, pid)
            await _discard_request(conn)
            await _reply(conn, {"ok": False, "error": f"uid {uid} may not control this mount "
                                "(only its owner and root may)"})
            return
        fds: list[int] = []
        try:
            request = await _receive(conn, fds)
            reply = await _handle(request, fds, control, ovl, gate)
        except (ValueError, OSError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": str(e)}
        finally:
            for fd in fds:  # those taken over were removed from the list
                os.close(fd)
        await _reply(conn, reply)


async def _receive(conn, fds: list[int]) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        msg, ancdata, _flags, _addr = await conn.recvmsg(65536, socket.CMSG_SPACE(
            MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % 4])
                fds.extend(got)
        if not msg:
            raise ValueError("the request ended early")
        data += msg
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    return request


async def _discard_request(conn) -> None:
    """Read a refused peer's request before answering it: hanging up first would meet a
    request sent late with EPIPE, or one unread with a reset, and the refusal would be lost."""
    fds: list[int] = []
    with trio.move_on_after(REFUSED_READ_TIMEOUT):
        try:
            await _receive(conn, fds)
        except (ValueError, OSError):
            pass
    for fd in fds:
        os.close(fd)


async def _reply(conn, reply: dict) -> None:
    try:
        data = memoryview(json.dumps(reply).encode() + b"\n")
        while data:
            data = data[await conn.send(data):]
    except OSError as e:
        log.debug("control reply not sent: %s", e)


def _fault(stage: str) -> None:
    if os.environ.get(FAULT_ENV) == stage:
        log.warning("fault injected at %s: SIGKILL", stage)
        os.kill(os.getpid(), signal.SIGKILL)


async def _handle(request: dict, fds: list[int], control: Control, ovl: Overlay,
                  gate) -> dict:
    op = request.get("op")
    if op == "ping":
        return {"ok": True, "pid": os.getpid(), "upper": ovl.spec.upperdir,
                "lowers": list(ovl.spec.lowerdirs), "held": sorted(control.held)}
    if op == "replace":
        return await _replace(request, fds, control, ovl, gate)
    if op != "freeze":
        raise ValueError(f"unknown request {op!r}")
    hold = [str(x) for x in request.get("hold", ())]
    share = [str(x) for x in request.get("share", ())]
    if len(hold) != len(fds):
        raise ValueError(f"{len(fds)} descriptors for {len(hold)} names")
    if any(name not in control.held for name in share):
        raise ValueError("a lock to share is not held here")
    lowers = [str(x) for x in request["lowers"]]
    if lowers != [ovl.spec.upperdir, *ovl.spec.lowerdirs]:
        raise ValueError("the store's idea of this mount's layers is not the daemon's")
    new = Prepared(ovl, str(request["upper"]), str(request["work"]))
    try:
        _fault("received")
        await gate.close()
        try:
            if not ovl.spec.volatile:
                await trio.to_thread.run_sync(_syncfs, ovl.spec.upperdir)
            _fault("synced")
            freeze(ovl, new)
            _fault("switched")
        finally:
            gate.open()
    finally:
        new.close()
    for name, fd in zip(hold, list(fds)):
        old = control.held.pop(name, -1)
        if old >= 0:
            os.close(old)
        control.held[name] = fd
        fds.remove(fd)
    for name in share:
        fcntl.flock(control.held[name], fcntl.LOCK_SH | fcntl.LOCK_NB)
    log.info("froze %s under %s", lowers[0], ovl.spec.upperdir)
    return {"ok": True, "upper": ovl.spec.upperdir}


async def _replace(request: dict, fds: list[int], control: Control, ovl: Overlay,
                   gate) -> dict:
    """Serve another state: what the old upper held is dropped (the store removes it)."""
    hold = [str(x) for x in request.get("hold", ())]
    if len(hold) != len(fds):
        raise ValueError(f"{len(fds)} descriptors for {len(hold)} names")
    was = [str(x) for x in request["was"]]
    if was != [ovl.spec.upperdir, *ovl.spec.lowerdirs]:
        raise ValueError("the store's idea of this mount's layers is not the daemon's")
    new = Prepared(ovl, str(request["upper"]), str(request["work"]),
                   tuple(str(x) for x in request["lowers"]))
    try:
        _fault("received")
        await gate.close()
        try:
            entries, kept = replace(ovl, new)
            _fault("switched")
        finally:
            gate.open()
    finally:
        new.close()
    old = control.held
    control.held = dict(zip(hold, fds))
    fds.clear()
    for fd in old.values():
        os.close(fd)
    # the kernel forgets what it cached of the old state (outside the trio thread: a call
    # waits for the requests on that dir, which need the loop)
    await trio.to_thread.run_sync(_invalidate, entries, kept)
    log.info("switched to %s on %d lowers", ovl.spec.upperdir, len(ovl.spec.lowerdirs))
    return {"ok": True, "upper": ovl.spec.upperdir, "forgotten": len(entries)}


def _invalidate(entries: list[tuple[int, bytes]], kept: list[int]) -> None:
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as e:  # ENOENT: the kernel holds no such entry
            log.debug("entry %r not invalidated: %s", name, e)
    for ino in kept:
        try:
            pyfuse3.invalidate_inode(ino, False)
        except OSError as e:
            log.debug("inode %d not invalidated: %s", ino, e)


def _syncfs(path: str) -> None:
    """Everything the daemon wrote to the old upper is on disk before it is called frozen."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
