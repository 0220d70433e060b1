"""Real podman as the client: overlayfuse and fuse-overlayfs as containers/storage's mount_program.

As root, with a private storage.conf (graph root, run root and mount_program in a temp dir) and
containers.conf (runc, cgroupfs, no default ulimits), an image built from scratch with podman
(busybox-static's /bin/busybox), no network.  ``podman run --uidmap/--gidmap`` and
``--userns=auto`` create files in the container; the owners seen inside and those stored in
the container's upper dir must be what the mapping says, the same for both mount programs.

Debian 12's podman 4.3 (containers/storage 1.43), as root on a kernel with idmapped mounts,
hands the mount program lowers that are idmapped mounts already *and* ``uidmapping=``: IDs are
shifted twice, the whole image shows as 65534, and runc cannot create /run/.containerenv in
the merged dir (EACCES).  Newer containers/storage skips idmapped lowers when a mount program
is set; here the run root is seeded with its cached probe result "idmapped-lower-dir-false",
which makes 4.3 do the same.  See the README.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mounts import REPO, force_unmount, mounts_under

NEEDED = ("podman", "runc", "fuse-overlayfs")


def _cgroups_mounted() -> bool:
    """runc needs a cgroup filesystem (a booted machine has one; a bare chroot does not)."""
    with open("/proc/self/mountinfo") as f:
        return any(" - cgroup" in line for line in f)


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="podman with --uidmap runs as root here"),
    pytest.mark.skipif(any(shutil.which(p) is None for p in NEEDED) or
                       not os.path.exists("/bin/busybox"),
                       reason="needs podman, runc, fuse-overlayfs and busybox-static "
                              "(tools/setup.sh installs them)"),
    pytest.mark.skipif(not _cgroups_mounted(),
                       reason="runc needs a cgroup filesystem, and none is mounted here"),
]

CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "mkdir", "-p", "/data", "/tmp", "/run", "/etc"]
"""
# what the container does; then what it saw
SCRIPT = ("touch /data/f && mkdir /data/d && chown 5:6 /data/f && ln -s f /data/l && "
          "echo hi > /etc/new && stat -c '%u:%g %n' / /data/f /data/d /etc/new && "
          "id -u && cat /proc/self/uid_map")
MAPPING = ["--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536"]


class Podman:
    """podman with its own storage and configuration, mount_program set to one program."""

    def __init__(self, base: Path, mount_program: str) -> None:
        self.base = base
        base.mkdir()
        self.args_log = base / "mount-program-args"
        shim = base / "mount-program"
        shim.write_text(f'#!/bin/sh\necho "$@" >> {self.args_log}\nexec {mount_program} "$@"\n')
        shim.chmod(0o755)
        run_root = base / "run"
        # containers/storage's cached probe: no idmapped lowers under the mount program
        (run_root / "overlay").mkdir(parents=True)
        (run_root / "overlay" / "idmapped-lower-dir-false").touch()
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/graph"\n'
            f'runroot = "{run_root}"\n[storage.options.overlay]\nmount_program = "{shim}"\n')
        (base / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n'
            f'runtime = "runc"\nevents_logger = "file"\ntmp_dir = "{base}/libpod-tmp"\n'
            f'volume_path = "{base}/volumes"\n')
        (base / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
                        CONTAINERS_CONF=str(base / "containers.conf"))

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {r.returncode}:\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def build_image(self) -> None:
        ctx = self.base / "ctx"
        ctx.mkdir()
        shutil.copy("/bin/busybox", ctx / "busybox")
        (ctx / "Containerfile").write_text(CONTAINERFILE)
        # chroot isolation: no OCI runtime (nor cgroups) for the build's RUN steps
        self("build", "--isolation", "chroot", "--signature-policy",
             str(self.base / "policy.json"), "-t", "ovftest", str(ctx))

    def run_and_inspect(self, *options: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
        """Run SCRIPT in a new container; (its output lines, owners stored in its upper)."""
        try:
            r = self("run", "--name", "probe", "--network", "none", *options, "ovftest",
                     "sh", "-c", SCRIPT)
            info = json.loads(self("inspect", "probe").stdout)[0]
            upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
            stored = {}
            for rel in ("data/f", "data/d", "data/l", "etc/new"):
                st = os.lstat(upper / rel)
                stored[rel] = (st.st_uid, st.st_gid)
        finally:
            # podman 4.3 with --uidmap marks the container cleaned up but often leaves its
            # shm tmpfs mounted (with either mount program); rm then fails with EBUSY
            for m in mounts_under(self.base / "graph" / "overlay-containers"):
                if m.mountpoint.endswith("/userdata/shm"):
                    force_unmount(m.mountpoint)
            self("rm", "-f", "probe", check=False)  # also after a failed run: the next test
        return r.stdout.splitlines(), stored

    def close(self) -> None:
        self("rm", "-af", check=False)
        self("rmi", "-af", check=False)
        for m in sorted(mounts_under(self.base), key=lambda m: len(m.mountpoint),
                        reverse=True):
            force_unmount(m.mountpoint)


@pytest.fixture(scope="module")
def podmen() -> Iterator[dict[str, Podman]]:
    """One podman setup (with the image built) per mount program."""
    import tempfile
    from unpriv import SESSION_HOMES
    # world-traversable: the container's root (host uid 100000) walks to the merged dir
    base = Path(tempfile.mkdtemp(prefix="ovf-podman-", dir="/tmp"))
    os.chmod(base, 0o755)
    SESSION_HOMES.append(base)
    shim = base / "overlayfuse-cli"
    shim.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m overlayfuse "$@"\n')
    shim.chmod(0o755)
    setups: dict[str, Podman] = {}
    try:
        for name, program in (("fuse-overlayfs", shutil.which("fuse-overlayfs")),
                              ("overlayfuse", str(shim))):
            setups[name] = Podman(base / name, program)
            setups[name].build_image()
        yield setups
    finally:
        for p in setups.values():
            p.close()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def containers_subids(start: int, count: int) -> Iterator[None]:
    """``containers:START:COUNT`` in /etc/subuid and /etc/subgid (what --userns=auto takes
    IDs from, as root); afterwards only that line is taken out again (useradd may have added
    others meanwhile), and a file that did not exist is removed if nothing else is in it."""
    line = f"containers:{start}:{count}"
    created = []
    for f in ("/etc/subuid", "/etc/subgid"):
        if not os.path.exists(f):
            created.append(f)
        with open(f, "a") as out:
            out.write(line + "\n")
    try:
        yield
    finally:
        for f in ("/etc/subuid", "/etc/subgid"):
            kept = [l for l in Path(f).read_text().splitlines() if l != line]
            if f in created and not kept:
                os.unlink(f)
            else:
                Path(f).write_text("".join(l + "\n" for l in kept))


def test_uidmap_same_with_both_mount_programs(podmen: dict[str, Podman]) -> None:
    results = {name: p.run_and_inspect(*MAPPING) for name, p in podmen.items()}
    for name, p in podmen.items():
        assert "uidmapping=:0:100000:65536" in p.args_log.read_text(), name
    seen, stored = results["overlayfuse"]
    assert results["fuse-overlayfs"] == results["overlayfuse"]
    # inside: the container's root owns its tree; the chown took
    assert seen[:4] == ["0:0 /", "5:6 /data/f", "0:0 /data/d", "0:0 /etc/new"]
    assert seen[4] == "0" and seen[5].split() == ["0", "100000", "65536"]
    # on disk: the container's IDs (fuse-overlayfs' design: the storage is shared by
    # containers with different mappings, so files are never chowned to host IDs)
    assert stored == {"data/f": (5, 6), "data/d": (0, 0), "data/l": (0, 0), "etc/new": (0, 0)}


def test_userns_auto_same_with_both_mount_programs(podmen: dict[str, Podman]) -> None:
    with containers_subids(300000, 200000):
        ranges = [tuple(int(x) for x in l.split(":")[1:])
                  for l in Path("/etc/subuid").read_text().splitlines()
                  if l.startswith("containers:")]
        results = {name: p.run_and_inspect("--userns=auto") for name, p in podmen.items()}
    seen, stored = results["overlayfuse"]
    assert results["fuse-overlayfs"] == results["overlayfuse"]
    uid_map = seen[5].split()
    assert uid_map[0] == "0" and any(a <= int(uid_map[1]) < a + n for a, n in ranges), seen
    assert seen[:4] == ["0:0 /", "5:6 /data/f", "0:0 /data/d", "0:0 /etc/new"]
    assert stored == {"data/f": (5, 6), "data/d": (0, 0), "data/l": (0, 0), "etc/new": (0, 0)}
    for name, p in podmen.items():
        assert f"uidmapping=:0:300000:{uid_map[2]}" in p.args_log.read_text(), name
