"""Taking a FUSE mount down: unmount (lazily when it stays busy) and see its daemon gone.

Shared by the FUSE trial, the scratch cleanup and the fuse backend, so that none of them can
leave a mount or a daemon behind.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

from .. import sysmount


def unmount_fuse(mountpoint: str, pid: int | None, timeout: float = 10.0,
                 wait: bool = True) -> None:
    """Unmount a FUSE mount and wait for its daemon to exit; escalate so nothing stays.

    Once unmounted the daemon exits within milliseconds (it is reaped later by init, which can
    take seconds here: a zombie counts as gone).  ``wait=False`` leaves the wait, and the
    SIGTERM/SIGKILL after ``timeout``, to a background thread.
    """
    for attempt in range(20):
        if not sysmount.is_mountpoint(mountpoint):
            break
        res = subprocess.run(["fusermount3", "-u", "-q", mountpoint],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode == 0:
            break
        if "busy" in res.stderr.lower() and attempt < 10:
            time.sleep(0.05)
            continue
        # still busy or unknown trouble: detach it lazily, the daemon then sees ENODEV
        subprocess.run(["fusermount3", "-u", "-z", "-q", mountpoint],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if os.geteuid() == 0 and sysmount.is_mountpoint(mountpoint):
            try:
                sysmount.umount2(mountpoint, sysmount.MNT_DETACH)
            except OSError:
                pass
        break
    if pid is None:
        return
    if wait:
        wait_pid_gone(pid, timeout)
    else:
        threading.Thread(target=wait_pid_gone, args=(pid, timeout), daemon=True,
                         name=f"overlayfuse-reap-{pid}").start()


def is_dead_fuse(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone (killed, crashed): every access answers ENOTCONN,
    "Transport endpoint is not connected", until it is unmounted."""
    if not sysmount.is_mountpoint(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)  # always asks the daemon: a stat may come from the kernel's cache
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def clear_dead_fuse(mountpoint: str) -> bool:
    """Take down a dead FUSE mount at ``mountpoint`` (nothing can use it any more, and its
    layers are safe to mount again: see the daemon's work-dir cleanup); True if there was one."""
    if not is_dead_fuse(mountpoint):
        return False
    unmount_fuse(mountpoint, None)
    return True


def wait_pid_gone(pid: int, timeout: float) -> None:
    """Wait for ``pid`` (not necessarily our child) to exit; SIGTERM, then SIGKILL it."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + (timeout if sig is None else 2.0)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:
                pass  # not our child: poll for its existence
            if _exited(pid):
                return
            time.sleep(0.01)


def _exited(pid: int) -> bool:
    """Gone or a zombie: a daemon double-forked by mount_fuse is reaped by init, not by us."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")
