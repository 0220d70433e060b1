"""A mounted config stays mounted: snapshots taken through the mount's FUSE daemon.

Each writable FUSE mount of a store listens on ``BASE/run/<hash of the mount point>.sock``
(fusefs/control.py; mode 0600, and the daemon checks the peer is its user or root).  A
snapshot of a mounted config then goes:

1. one transaction records the switch (table ``switches``: the old upper, the fresh one, the
   snapshot's name, the lock this command holds while it lives), makes the fresh upper's dirs
   (a child of the old upper, held by the ``.next`` reference) and locks it;
2. the daemon is asked to freeze: it lets the requests in flight finish, holds new ones,
   syncs the old upper, serves the fresh one on top, takes this command's lock fd on it
   and keeps the old upper's lock shared from then on;
3. one transaction applies the switch (snapshot, ``.current`` and ``.upper``, the mount
   row's layers) and forgets the record.

Killed anywhere, the record decides (``LayerStore.settle``, run by every reap and gc): the
daemon holds the fresh upper's lock only once it switched (forward); a live daemon without
it never switched (back); a dead daemon left the old upper complete (forward).
"""
from __future__ import annotations

import array
import ctypes
import json
import os
import signal
import socket
import time

from ..errors import OverlayfuseError
from . import catalog as cat
from .disk import TmpEntry, as_owner, make_layer_root
from .locks import lock_all
from .store import LayerStore, MountRow

_libc = ctypes.CDLL(None, use_errno=True)
REPLY_TIMEOUT = 600.0  # s: a switch waits for the requests in flight, a syncfs for the disk
# tests: the stage at which a process SIGKILLs itself (fusefs/control.py reads it in the
# daemon: received, synced, switched; here, in the command: recorded, replied)
FAULT_ENV = "OVERLAYFUSE_SWITCH_FAULT"


class DaemonGone(OverlayfuseError):
    """The daemon ended (or never answered) before replying."""


def control_path(store: LayerStore, mountpoint: str) -> str:
    """The socket of the daemon serving ``mountpoint`` (derived from the mounts row's key)."""
    return store.layout.control(mountpoint)


def prepare_run_dir(store: LayerStore) -> None:
    """``BASE/run``, private to the store's owner (stores made before it lack it)."""
    run = store.layout.sub("run")
    try:
        os.mkdir(run, 0o700)
    except FileExistsError:
        return
    owner = store.owner
    if os.geteuid() == 0 and owner[0] != 0:
        os.chown(run, *owner)


def ask(path: str, request: dict, fds: list[int] | tuple[int, ...] = (),
        timeout: float = REPLY_TIMEOUT) -> dict:
    """Send one request (with ``fds``) to the daemon at ``path``; its reply.  DaemonGone when
    nobody listens or the daemon hangs up before replying."""
    d, name = os.path.split(path)
    try:
        dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise DaemonGone(f"no control socket at {path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(f"/proc/self/fd/{dirfd}/{name}")
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonGone(f"the daemon does not answer at {path}: {e.strerror}") from None
        except PermissionError as e:
            raise OverlayfuseError(f"cannot reach the mount's daemon at {path}: {e.strerror} "
                                   "(only its owner and root may)") from None
        data = json.dumps(request).encode() + b"\n"
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            sent = sock.sendmsg([data], anc)
            if sent < len(data):
                sock.sendall(data[sent:])
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise DaemonGone("the daemon ended before it replied")
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            raise DaemonGone("the daemon ended before it replied") from None
        except socket.timeout:
            raise OverlayfuseError(f"the daemon at {path} did not reply within "
                                   f"{timeout:.0f} s") from None
    finally:
        sock.close()
        os.close(dirfd)
    out = json.loads(reply)
    if not out.get("ok"):
        raise OverlayfuseError(f"the mount's daemon refused: {out.get('error', '?')}")
    return out


def live_writer(store: LayerStore, config: str) -> MountRow | None:
    """The live writable mount of ``config`` on its upper, if any."""
    with store.txn() as conn:
        store.settle(conn)
        upper = cat.ref(conn, config, cat.UPPER)
        for row in store.mount_rows(conn, config):
            if row.writable and row.layers and row.layers[0] == upper \
                    and not row.mountpoint.startswith("run:"):
                return row
    return None


def freeze(store: LayerStore, config: str, row: MountRow, name: str | None,
           force: bool = False) -> None:
    """Freeze the upper of the FUSE mount ``row`` as snapshot ``name`` (see the module doc);
    the mount goes on with a fresh upper.  Raises when the daemon refuses (nothing changed)
    or dies (then the snapshot is taken, and the mount is dead: the message says so)."""
    _switch(store, config, row, "freeze", name=name, force=force)


def replace(store: LayerStore, config: str, row: MountRow, target: str | None,
            layer: str | None = None) -> None:
    """Switch the FUSE mount ``row`` to the state of the reference ``target`` (a snapshot
    for a rollback, ``.current`` for a clean) or of ``layer`` (a build's result) with a
    fresh upper; the old upper's changes are dropped."""
    _switch(store, config, row, "replace", target=target, layer=layer)


def _switch(store: LayerStore, config: str, row: MountRow, kind: str, *,
            name: str | None = None, force: bool = False, target: str | None = None,
            layer: str | None = None) -> None:
    layout, owner = store.layout, store.owner
    path = control_path(store, row.mountpoint)
    if kind == "freeze":
        _flush(row.mountpoint)
    with TmpEntry(layout, "switch-" + os.urandom(6).hex()) as tmp:
        with store.txn() as conn:
            store.settle(conn)
            old = cat.ref(conn, config, cat.UPPER)
            if old != row.layers[0]:
                raise OverlayfuseError(f"config {config!r} changed meanwhile: try again")
            if name is not None and cat.ref(conn, config, name) is not None and not force:
                raise OverlayfuseError(f"snapshot {name!r} exists already in config "
                                       f"{config!r} (--force moves it)")
            if conn.execute("SELECT 1 FROM switches WHERE config=?", (config,)).fetchone():
                raise OverlayfuseError(f"config {config!r} is being switched by another "
                                       "command")
            if kind == "freeze":
                parent, below = old, list(row.layers)
            else:
                parent = layer if layer in cat.layer_ids(conn) else \
                    cat.ref(conn, config, target) if target else None
                if parent is None:
                    raise OverlayfuseError(f"no snapshot {target!r} in config {config!r}")
                below = cat.chain(conn, parent)
            new = cat.new_layer_id()
            locks = lock_all([(layout.lock(new), True)]
                             + ([(layout.lock(x), False) for x in below]
                                if kind == "replace" else []))
            if locks is None:
                raise OverlayfuseError(f"the layers of config {config!r} are taken")
            try:
                layer_dir, work_dir = (os.path.join(tmp.path, x) for x in ("layer", "work"))
                make_layer_root(layer_dir, layout.layer(parent), owner)
                make_layer_root(work_dir, None, owner)
                cat.add_layer(conn, new, parent)
                cat.set_ref(conn, config, cat.NEXT, new)
                conn.execute("INSERT INTO switches(config, mountpoint, kind, snapshot, target, "
                             "old, new, client, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (config, row.mountpoint, kind, name, parent, old, new,
                              tmp.lock_path, time.time()))
                dest = layout.layer(new)
                as_owner(lambda: os.rename(layer_dir, dest))
                os.rename(work_dir, layout.work(new))
            except BaseException:
                locks.release()
                raise
        request: dict = {"op": kind, "upper": layout.layer(new), "work": layout.work(new)}
        if kind == "freeze":
            request.update(lowers=[layout.layer(x) for x in row.layers], hold=[new],
                           share=[old])
        else:
            request.update(was=[layout.layer(x) for x in row.layers],
                           lowers=[layout.layer(x) for x in below], hold=[new, *below])
        gone: DaemonGone | None = None
        refused: OverlayfuseError | None = None
        try:
            _fault("recorded")
            ask(path, request, locks.fds)
            _fault("replied")
        except DaemonGone as e:
            gone = e
        except OverlayfuseError as e:
            refused = e
        finally:
            locks.release()  # the daemon holds its own copies once it switched
        with store.txn() as conn:
            store.finish_switch(conn, config, forward=refused is None)
    if refused is not None:
        raise refused
    if gone is not None:
        what = {"freeze": f"snapshot {name!r} is taken" if name else "the upper is frozen",
                "replace": f"config {config!r} is at {target or layer}"}[kind]
        raise OverlayfuseError(f"{gone}: {what}, but the mount at {row.mountpoint} is dead "
                               f"(overlayfuse store umount {row.mountpoint}, then mount it "
                               "again)")


def holders(mountpoint: str) -> list[tuple[int, str]]:
    """(pid, command) of the processes that hold ``mountpoint``: a cwd, a root, an open file
    or a mapped file inside it (what keeps the kernel from unmounting it)."""
    inside = mountpoint.rstrip("/") + "/"
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            links = [os.readlink(f"/proc/{pid}/{x}") for x in ("cwd", "root")]
            fds = f"/proc/{pid}/fd"
            for fd in os.listdir(fds):
                try:
                    links.append(os.readlink(f"{fds}/{fd}"))
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as maps:
                links += [line.split(None, 5)[5].strip() for line in maps
                          if len(line.split(None, 5)) == 6]
            if any(x == mountpoint or x.startswith(inside) for x in links):
                with open(f"/proc/{pid}/comm") as comm:
                    out.append((pid, comm.read().strip()))
        except OSError:
            continue  # gone, or not ours to read
    return sorted(out)


def _fault(stage: str) -> None:
    if os.environ.get(FAULT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _flush(mountpoint: str) -> None:
    """Writes the kernel holds for the mount (its writeback cache) go to the daemon first:
    whatever a writer saw acknowledged before the snapshot is in it."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # a dead mount: the switch request finds out
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OverlayfuseError(f"cannot sync {mountpoint}: {os.strerror(err)}")
    finally:
        os.close(fd)
