"""Podman and the store's images: podman runs an exported snapshot, and an image podman built
imports into a config equal to ``podman image mount``.

As root, podman with a private storage.conf (vfs driver, graph and run roots in a temp dir) and
containers.conf (runc, cgroupfs), no network; skopeo reads podman's store through the same
CONTAINERS_STORAGE_CONF.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import busybox_tree
from mounts import diff_trees, force_unmount, mounts_under
from oci_helpers import cli, ok, view


def _cgroups_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(" - cgroup" in line for line in f)


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="podman runs as root here"),
    pytest.mark.skipif(any(shutil.which(p) is None for p in ("podman", "runc", "skopeo"))
                       or not os.path.exists("/bin/busybox"),
                       reason="needs podman, runc, skopeo and busybox-static "
                              "(tools/setup.sh installs them)"),
]

APPLETS = ("sh", "find", "stat", "mkdir", "chown", "ln", "rm", "echo")
# what both sides list: every entry under these (not etc/: podman adds its hosts files),
# with owner, mode, size and type
LIST = ("cd / && busybox find data bin root -exec busybox stat -c '%n|%u:%g|%a|%s|%F' "
        "{} + | busybox sort")
CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "sh", "-c", "mkdir -p /data/d && echo hi > /data/d/f && chown 5:6 \
/data/d/f && ln /data/d/f /data/hard && rm /bin/wget && chmod 4755 /data/d/f"]
"""


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = base
        (base / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{base}/graph"\n'
            f'runroot = "{base}/run"\n')
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

    def close(self) -> None:
        self("rm", "-af", check=False)
        self("image", "unmount", "-a", check=False)
        self("rmi", "-af", check=False)
        for m in sorted(mounts_under(self.base), key=lambda m: len(m.mountpoint),
                        reverse=True):
            force_unmount(m.mountpoint)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    p = Podman(tmp_path_factory.mktemp("podman"))
    try:
        yield p
    finally:
        p.close()


@pytest.mark.skipif(not _cgroups_mounted(), reason="runc needs a cgroup filesystem")
def test_podman_runs_an_exported_snapshot(podman: Podman, tmp_path: Path) -> None:
    base = tmp_path / "base"
    src = busybox_tree(tmp_path / "src", APPLETS, dirs=("bin", "etc", "root", "tmp", "data"))
    ok(cli(base, "init", "--from", str(src)))
    ok(cli(base, "run", "--", "sh", "-c",
           "mkdir -p /data/d && echo hi > /data/d/f && chown 5:6 /data/d/f && "
           "ln -s f /data/d/l && rm /bin/echo && chown 7:8 /root"))
    ok(cli(base, "snapshot", "s"))
    layout = tmp_path / "layout"
    ok(cli(base, "export", "--snapshot", "s", f"oci:{layout}:s"))
    r = podman("run", "--rm", "--network", "none", "--signature-policy",
               str(podman.base / "policy.json"), f"oci:{layout}:s", "/bin/sh", "-c", LIST)
    inside = r.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(cli(base, "mount", "--snapshot", "s", str(mnt)))
    try:
        outside = subprocess.run(["/bin/busybox", "sh", "-c", LIST.replace("cd /", f"cd {mnt}")],
                                 capture_output=True, text=True, check=True).stdout
    finally:
        ok(cli(base, "umount", str(mnt)))
    assert "data/d/f|5:6|644|3|regular file" in outside and "bin/echo|" not in outside
    assert inside.splitlines() == outside.splitlines()


def test_a_podman_built_image_imports(podman: Podman, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy("/bin/busybox", ctx / "busybox")
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    podman("build", "--isolation", "chroot", "--signature-policy",
           str(podman.base / "policy.json"), "-t", "ovfbuilt", str(ctx))
    base = tmp_path / "base"
    r = ok(cli(base, "init", "--from-image", "containers-storage:localhost/ovfbuilt",
               env=podman.env))
    assert "imported 3 layers" in r.stderr, r.stderr
    mounted = Path(podman("image", "mount", "localhost/ovfbuilt").stdout.strip())
    try:
        expected = view(mounted)
    finally:
        podman("image", "unmount", "localhost/ovfbuilt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(cli(base, "mount", "--snapshot", "postinit", str(mnt)))
    try:
        got = view(mnt)
    finally:
        ok(cli(base, "umount", str(mnt)))
    assert expected["entries"]["data/d/f"][1] == 0o4755
    assert "bin/wget" not in expected["entries"] and "bin/ls" in expected["entries"]
    assert diff_trees(expected["entries"], got["entries"]) == []
    assert expected["links"] == got["links"] == [["data/d/f", "data/hard"]]
    # the image's layers have no entry for the root: its time is when each side unpacked it
    del expected["mtimes"]["."], got["mtimes"]["."]
    assert expected["mtimes"] == got["mtimes"]
