"""The command line with real mounts: fuse-overlayfs form, mount.fuse3 form, umount, -m vs script.

The drop-in forms daemonize, so these tests find the daemon by its command line (it holds the
unique mount point) and make sure it exits after the unmount; every mount is taken down even
when an assertion fails.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mounts import (REPO, esc, force_unmount, is_mounted, kernel_overlay, make_layers, mounts_at,
                    overlayfuse_pids)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")

SCRIPT = Path(sys.executable).parent / "overlayfuse"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def ovf(*args: str, cwd: Path | str | None = None, prog: Sequence[str] | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI (``python -m overlayfuse`` unless ``prog``) and wait for it."""
    argv = [*(prog or (sys.executable, "-m", "overlayfuse")), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd or REPO,
                          env=env or cli_env(), stdin=subprocess.DEVNULL, timeout=60)


@contextlib.contextmanager
def daemonized(mnt: Path) -> Iterator[None]:
    """Around a CLI mount that daemonizes: unmount (if still mounted) and see the daemon exit."""
    try:
        yield
    finally:
        mounted = is_mounted(mnt)
        if mounted:
            force_unmount(mnt)
        deadline = time.monotonic() + 10
        while overlayfuse_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = overlayfuse_pids(mnt)
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not stuck, f"daemon(s) {stuck} did not exit after the unmount of {mnt}"


def mount_entry(mnt: Path):  # noqa: ANN201 - mounts.MountEntry
    entries = mounts_at(mnt)
    assert entries, f"{mnt} is not mounted"
    return entries[-1]


def mount_flags(mnt: Path) -> set[str]:
    """Per-mount flags (mountinfo field 6: rw/ro, nodev, noatime, ...)."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                flags = set(fields[5].split(","))
    return flags


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Lowers and dirs with awkward names: ':' and ',' need ``\\:`` and ``\\,`` escapes, and
    the top lower is reached through a relative symlink."""
    root = tmp_path / "w"
    top, bottom = root / "real" / "top:lower,1", root / "bottom"
    for d in (top, bottom, root / "up,per", root / "wo:rk", root / "mnt", root / "links"):
        d.mkdir(parents=True)
    (bottom / "shared").write_text("bottom\n")
    (bottom / "only-bottom").write_text("b\n")
    (top / "shared").write_text("top\n")
    os.symlink("../real/top:lower,1", root / "links" / "top")
    return root


def check_merged(root: Path, mnt: Path) -> None:
    """The two lowers merged top first, and a write landing in the upper."""
    assert sorted(os.listdir(mnt)) == ["only-bottom", "shared"]
    assert (mnt / "shared").read_text() == "top\n"
    (mnt / "new").write_text("new\n")
    assert (root / "up,per" / "new").read_text() == "new\n"


# -- the fuse-overlayfs form ------------------------------------------------------------------

def test_fuse_overlayfs_form_mounts_in_background(tree: Path) -> None:
    """What container engines run: relative symlinked lowers, escapes, ',,', volatile,
    harmless options; it returns once mounted and the daemon stays."""
    mnt = tree / "mnt"
    opts = (r"lowerdir=links/top:bottom,upperdir=up\,per,,workdir=wo\:rk,,volatile,lazytime,"
            'noatime,nodev,fsync=0,context="system_u:object_r:container_file_t:s0:c1,c2",'
            "squash_to_root,static_nlink,noacl,,")
    with daemonized(mnt):
        r = ovf("-o", opts, str(mnt), cwd=tree)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        entry = mount_entry(mnt)  # mounted when the command returned
        assert (entry.fstype, entry.source) == ("fuse.overlayfuse", "overlayfuse")
        assert {"allow_other", "default_permissions"} <= set(entry.options.split(","))
        assert {"noatime", "nodev"} <= mount_flags(mnt)
        assert overlayfuse_pids(mnt), "no daemon in the background"
        check_merged(tree, mnt)
        r = ovf("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
    # the upper keeps the change after the unmount
    assert (tree / "up,per" / "new").read_text() == "new\n"


def test_fuse_overlayfs_form_read_only_and_ro_option(tree: Path) -> None:
    """``lowerdir=`` alone is a read-only overlay; ``ro`` is passed to the FUSE mount."""
    mnt = tree / "mnt"
    with daemonized(mnt):
        r = ovf("-o", "lowerdir=links/top:bottom,ro", str(mnt), cwd=tree)
        assert r.returncode == 0, r.stderr
        assert "ro" in mount_flags(mnt)
        assert (mnt / "shared").read_text() == "top\n"
        with pytest.raises(OSError) as e:
            (mnt / "x").write_text("x")
        assert e.value.errno == errno.EROFS
        assert ovf("umount", str(mnt)).returncode == 0


@pytest.mark.parametrize("flag, extra", [("-f", ""), (None, ",debug")])
def test_fuse_overlayfs_form_foreground(tree: Path, flag: str | None, extra: str) -> None:
    """``-f`` serves in the foreground until unmounted, then exits 0; ``-o debug`` (libfuse's
    and fuse-overlayfs' spelling of ``-d``) does too, with libfuse's request trace."""
    mnt = tree / "mnt"
    with daemonized(mnt):
        proc = subprocess.Popen([sys.executable, "-m", "overlayfuse", *filter(None, [flag]),
                                 "-o", "lowerdir=links/top:bottom,upperdir=up\\,per,"
                                 "workdir=wo\\:rk" + extra,
                                 str(mnt)], cwd=tree, env=cli_env(), stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not is_mounted(mnt):
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "no mount within 20s"
                time.sleep(0.02)
            check_merged(tree, mnt)
            assert ovf("umount", str(mnt)).returncode == 0
            assert proc.wait(10) == 0
            trace = "opcode: INIT" in proc.stderr.read()
            assert trace == bool(extra)
        finally:
            if proc.poll() is None:
                force_unmount(mnt)
                proc.kill()
                proc.wait()


# -- the mount.fuse3 form ---------------------------------------------------------------------

# mount(8) runs its helpers without PATH, so mount.fuse3's shell finds ``overlayfuse`` in the
# shell's default PATH only (/usr/local/sbin first).  Rather than install into the system, the
# scenario runs in a private mount namespace whose /usr/local/sbin holds a shim for this
# checkout; the FUSE mount is real, and the namespace (with anything left in it) dies after.
MOUNT_T_SCENARIO = r"""
import json, os, subprocess, sys
mnt, opts, bindir, upper = sys.argv[1:5]
out = {}
subprocess.run(["mount", "--bind", bindir, "/usr/local/sbin"], check=True)
r = subprocess.run(["mount", "-t", "fuse.overlayfuse", "overlayfuse", mnt, "-o", opts],
                   capture_output=True, text=True, stdin=subprocess.DEVNULL)
out["mount"] = [r.returncode, r.stderr]
try:
    if r.returncode == 0:
        for line in open("/proc/self/mountinfo"):
            left, _, right = line.partition(" - ")
            if left.split()[4] == mnt:
                out["flags"] = left.split()[5].split(",")
                out["fstype"], out["source"] = right.split()[:2]
        out["listing"] = sorted(os.listdir(mnt))
        out["shared"] = open(os.path.join(mnt, "shared")).read()
        with open(os.path.join(mnt, "new"), "w") as f:
            f.write("new\n")
        out["in_upper"] = open(os.path.join(upper, "new")).read()
        r = subprocess.run(["umount", mnt], capture_output=True, text=True)
        out["umount"] = [r.returncode, r.stderr]
        out["still_mounted"] = any(l.split()[4] == mnt for l in open("/proc/self/mountinfo"))
finally:
    subprocess.run(["umount", "-l", mnt], capture_output=True)
print(json.dumps(out))
"""


def test_mount_t_fuse_overlayfuse(tree: Path, tmp_path: Path) -> None:
    """``mount -t fuse.overlayfuse overlayfuse MNT -o ...`` (the /etc/fstab form), through
    mount(8) and mount.fuse3, which adds rw, dev and suid of its own."""
    bindir = tmp_path / "sbin"
    bindir.mkdir()
    shim = bindir / "overlayfuse"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m overlayfuse "$@"\n')
    shim.chmod(0o755)
    mnt = tree / "mnt"
    opts = ",".join([f"lowerdir={esc(tree / 'links' / 'top')}:{esc(tree / 'bottom')}",
                     f"upperdir={esc(tree / 'up,per')}", f"workdir={esc(tree / 'wo:rk')}",
                     "noatime"])
    with daemonized(mnt):
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                            "-c", MOUNT_T_SCENARIO, str(mnt), opts, str(bindir),
                            str(tree / "up,per")],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    assert out["mount"] == [0, ""]
    assert (out["fstype"], out["source"]) == ("fuse.overlayfuse", "overlayfuse")
    assert "noatime" in out["flags"]
    assert not {"nodev", "nosuid"} & set(out["flags"])  # mount.fuse3 asked for dev,suid
    assert out["listing"] == ["only-bottom", "shared"]
    assert out["shared"] == "top\n"
    assert out["in_upper"] == "new\n"
    assert out["umount"] == [0, ""]
    assert out["still_mounted"] is False


def test_mount_fuse3_argv_form(tree: Path) -> None:
    """``overlayfuse SOURCE MNT -o OPTS`` as mount.fuse3 runs it, with its rw,dev,suid."""
    mnt = tree / "mnt"
    with daemonized(mnt):
        r = ovf("overlayfuse", str(mnt), "-o",
                r"rw,lowerdir=links/top:bottom,upperdir=up\,per,workdir=wo\:rk,dev,suid",
                cwd=tree)
        assert r.returncode == 0, r.stderr
        assert not {"nodev", "nosuid"} & mount_flags(mnt)  # root asked for dev,suid
        check_merged(tree, mnt)
        assert ovf("umount", str(mnt)).returncode == 0


# -- the mount subcommand ---------------------------------------------------------------------

def test_mount_subcommand_fuse_verbose(tree: Path) -> None:
    """``mount --backend fuse -v``: background daemon, and -v says which backend and why."""
    mnt = tree / "mnt"
    with daemonized(mnt):
        r = ovf("mount", "--backend", "fuse", "-v", "-o",
                r"lowerdir=links/top:bottom,upperdir=up\,per,workdir=wo\:rk", str(mnt), cwd=tree)
        assert r.returncode == 0, r.stderr
        assert "backend fuse" in r.stderr
        assert mount_entry(mnt).fstype == "fuse.overlayfuse"
        check_merged(tree, mnt)
        assert ovf("umount", str(mnt)).returncode == 0


def test_mount_subcommand_kernel_and_umount(tree: Path) -> None:
    mnt = tree / "mnt"
    opts = (f"lowerdir={esc(tree / 'links' / 'top')}:{esc(tree / 'bottom')},"
            f"upperdir={esc(tree / 'up,per')},workdir={esc(tree / 'wo:rk')},nodev")
    try:
        r = ovf("mount", "--backend", "kernel", "-o", opts, str(mnt))
        assert r.returncode == 0, r.stderr
        assert mount_entry(mnt).fstype == "overlay"
        assert "nodev" in mount_flags(mnt)
        check_merged(tree, mnt)
        r = ovf("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_umount_of_a_kernel_overlay(tmp_path: Path) -> None:
    layers = make_layers(tmp_path)
    with kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt):
        r = ovf("umount", str(layers.mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)


def test_umount_of_something_not_mounted(tmp_path: Path) -> None:
    r = ovf("umount", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"overlayfuse: {tmp_path} is not mounted"]


def test_umount_refuses_other_filesystems(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "ovf-test", str(d)], check=True)
    try:
        r = ovf("umount", str(d))
        assert r.returncode == 1
        assert r.stderr.splitlines() == [f"overlayfuse: {d} is a tmpfs mount, not an overlay"]
        assert is_mounted(d)
    finally:
        assert force_unmount(d)


# -- python -m overlayfuse and the script -----------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--version"],
    ["--help"],
    ["mount", "--help"],
    ["umount", "/nonexistent-ovf"],
    ["-o", "lowerdir=/nonexistent-ovf", "/nonexistent-mnt"],
    ["mount", "-o", "lowerdir=/,bogus", "/nonexistent-mnt"],
    [],
])
def test_module_and_script_behave_the_same(args: list[str]) -> None:
    assert SCRIPT.exists(), f"the console script {SCRIPT} is not installed (pip install -e .)"
    a = ovf(*args)
    b = ovf(*args, prog=[str(SCRIPT)])
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert "Traceback" not in a.stderr


def test_script_mounts_like_the_module(tree: Path) -> None:
    mnt = tree / "mnt"
    with daemonized(mnt):
        r = ovf("-o", r"lowerdir=links/top:bottom,upperdir=up\,per,workdir=wo\:rk", str(mnt),
                cwd=tree, prog=[str(SCRIPT)])
        assert r.returncode == 0, r.stderr
        check_merged(tree, mnt)
        r = ovf("umount", "mnt", cwd=tree, prog=[str(SCRIPT)])
        assert r.returncode == 0, r.stderr


def test_main_in_process_returns_status(capsys: pytest.CaptureFixture[str]) -> None:
    """``cli.main`` returns the status instead of exiting: usable from Python."""
    from overlayfuse.cli import main
    assert main(["umount", "/nonexistent-ovf"]) == 1
    assert capsys.readouterr().err == "overlayfuse: /nonexistent-ovf is not mounted\n"


def test_unprivileged_fuse_overlayfs_form_and_umount(unprivileged) -> None:  # noqa: ANN001
    """A normal user: the drop-in form mounts through fusermount3 (no allow_other), and
    ``overlayfuse umount`` unmounts with fusermount3 -u."""
    u = unprivileged
    layers = u.make_layers()
    (layers.lowers[1] / "f").write_text("low\n")
    u.chown(layers.lowers[1] / "f")
    opts = f"lowerdir={esc(layers.lowers[0])}:{esc(layers.lowers[1])},upperdir=" \
           f"{esc(layers.upper)},workdir={esc(layers.work)},,noatime"
    try:
        r = u.run([u.python, "-m", "overlayfuse", "-o", opts, str(layers.mnt)],
                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 0, r.stderr
        entry = mount_entry(layers.mnt)
        assert entry.fstype == "fuse.overlayfuse"
        assert "allow_other" not in entry.options.split(",")
        r = u.python_run(f"p = {str(layers.mnt)!r}; print(open(p + '/f').read(), end=''); "
                         "open(p + '/new', 'w').write('x')")
        assert (r.returncode, r.stdout) == (0, "low\n"), r.stderr
        assert os.stat(layers.upper / "new").st_uid == u.uid
        r = u.run([u.python, "-m", "overlayfuse", "umount", str(layers.mnt)],
                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(layers.mnt)
        deadline = time.monotonic() + 10
        while overlayfuse_pids(layers.mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not overlayfuse_pids(layers.mnt), "the daemon did not exit after the unmount"
    finally:
        if is_mounted(layers.mnt):
            force_unmount(layers.mnt, u)
        for pid in overlayfuse_pids(layers.mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_check_says_which_ids_store_runs_map(unprivileged, no_subids,  # noqa: ANN001
                                             tmp_path: Path) -> None:
    """``overlayfuse check`` names the caller's subordinate ranges that store runs map, or says
    that one ID only will be mapped and what to add; root hears that it keeps the host's IDs."""
    from unpriv import subordinate_ids
    u = unprivileged

    def check(*extra: str) -> str:
        r = u.run([u.python, "-m", "overlayfuse", "check", "--upper", str(u.home), *extra],
                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    line = next(x for x in check().splitlines() if x.startswith("store run IDs: "))
    assert line.startswith(f"store run IDs: user namespace with one ID (0 is uid {u.uid}; ")
    assert f"no range for {u.user} in /etc/subuid" in line
    assert "usermod --add-subuids" in line and line.endswith(u.user)
    start, count = 840000, 65536
    span = f"{start}-{start + count - 1}"
    with subordinate_ids(u.user, start, count):
        assert f"store run IDs: user namespace: 0 is uid {u.uid}, 1-{count} are {span} " \
               f"(/etc/subuid), gids {span} (/etc/subgid)\n" in check()
        assert json.loads(check("--json"))["store_run_ids"] == (
            f"user namespace: 0 is uid {u.uid}, 1-{count} are {span} (/etc/subuid), "
            f"gids {span} (/etc/subgid)")
    r = ovf("check", "--json", "--upper", str(tmp_path))
    assert json.loads(r.stdout)["store_run_ids"] == (
        "running as root: no user namespace, the host's IDs"), r.stderr
