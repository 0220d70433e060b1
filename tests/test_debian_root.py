"""A real distribution root, rootless: a Debian 12 minbase tree built in as a normal user.

The tree is made once by ``debootstrap --variant=minbase bookworm`` (about 30 s here, fetching
from deb.debian.org) and cached, packed as a zstd tarball of 81 MiB, outside the repo in
``/var/tmp/overlayfuse-test-cache/bookworm-minbase-v1.tar.zst`` (delete it to make it again; a
half-made one is never used: it is built under a temporary name and renamed into place).  With
a warm cache the test takes 25 s (45 s on a busy machine), the apt steps fetching from the
mirror.

As ``ovfuser`` with subordinate ranges: ``store init --from-tar``, then ``overlayfuse build``
with ``useradd``, a ``chown -R``, ``dpkg -i`` of a .deb made here (its postinst chowns and
chmods, one file is setuid), ``dpkg --verify`` and ``apt-get install`` from the mirror, every
step with the tree as ``/`` (kernel overlayfs in a user namespace).  The same steps run as
root in a plain chroot of a copy of the tree: both trees list the same names, types, modes,
owners (inside IDs; the layers on the host hold subordinate IDs) and contents.  The same
config mounted with ``store mount`` (FUSE, as the user) shows the same tree with the host's
subordinate IDs.  Then ``store shell``, snapshot and rollback, and the housekeeping that
leaves nothing behind.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mounts import mounts_under
from unpriv import Unprivileged, subordinate_ids

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root")]

CACHE_DIR = Path("/var/tmp/overlayfuse-test-cache")
CACHE_KEY = "bookworm-minbase-v1"
MIRROR = "http://deb.debian.org/debian"  # as in the host's /etc/apt/sources.list.d
SUB_START, SUB_COUNT = 1_100_000, 65536  # apart from the other tests' ranges
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/root"}
TIMEOUT = 600
DEB = "ovf-demo_1.0_all.deb"

# the build's steps; the chroot runs the same text (the leak step without its background job)
STEPS = (
    "useradd -m alice",
    "echo hello alice > /home/alice/notes && mkdir /home/alice/sub && "
    "echo deep > /home/alice/sub/f && chown -R alice:alice /home/alice",
    f"dpkg -i /pkgs/{DEB}",
    "dpkg --verify",
    "apt-get update && apt-get install -y --no-install-recommends hello",
)

# Left out of the comparison of the two trees, and why: /proc, /sys, /dev are the runs' own
# mounts (the sandbox's tmpfs and proc, the chroot's binds); /pkgs is the --bind's mount point
# (made for the run, taken out of the layer again); /etc/resolv.conf and /etc/hosts are the
# host's shown over the tree's (the chroot gets a copy); var/log holds times, var/cache apt's
# downloaded .debs and debconf's caches, var/lib/apt/lists the index files as fetched at
# that moment (the mirror may change between the two fetches).
PRUNED = ("./proc", "./sys", "./dev", "./pkgs", "./etc/resolv.conf", "./etc/hosts",
          "./var/log", "./var/cache", "./var/lib/apt/lists")
_PRUNE = " -o ".join(f"-path {p}" for p in PRUNED)
# names, types, modes, owners (numbers), sizes of non-dirs, link targets, sha256 of files:
# run with the tree's own find and sha256sum (the FUSE side with the host's: the same Debian)
LISTING = (
    'cd "$1" || exit 1\n'
    f"find . -xdev \\( {_PRUNE} \\) -prune -o -type d -printf 'D %m %U %G %p\\n'\n"
    f"find . -xdev \\( {_PRUNE} \\) -prune -o ! -type d -printf 'F %y %m %U %G %s %p\\t%l\\n'\n"
    f"find . -xdev \\( {_PRUNE} \\) -prune -o -type f -print0 | xargs -0r sha256sum\n")

# files holding the day they were written (shadow's "last changed" field): compared with that
# field masked, so two runs on either side of midnight still agree
DATED = ("./etc/shadow", "./etc/shadow-")

Entry = tuple[Any, ...]


# -- the cached Debian tarball ----------------------------------------------------------------

def _remove_tree(path: Path) -> None:
    """rmtree, after detaching whatever a killed debootstrap left mounted in it."""
    for m in sorted(mounts_under(path), key=lambda m: len(m.mountpoint), reverse=True):
        subprocess.run(["umount", "-l", m.mountpoint], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _make_tarball(tarball: Path) -> None:
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing: tools/setup.sh installs it", pytrace=False)
    work = Path(tempfile.mkdtemp(prefix=f".{CACHE_KEY}-building-", dir=CACHE_DIR))
    try:
        started = time.monotonic()
        # in a mount namespace of its own: its /proc and /sys mounts die with it
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "debootstrap",
                            "--variant=minbase", "bookworm", str(work / "root"), MIRROR],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"debootstrap failed ({r.returncode}): "
                        f"{(r.stdout + r.stderr).strip()[-2000:]}", pytrace=False)
        made = time.monotonic()
        out = work / "out.tar.zst"
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--zstd", "-C",
                        str(work / "root"), "-cf", str(out), "."], check=True)
        os.chmod(out, 0o644)
        os.replace(out, tarball)
        log.info("debootstrap took %.1f s, tar %.1f s: %s (%d MiB)", made - started,
                 time.monotonic() - made, tarball, tarball.stat().st_size >> 20)
    finally:
        _remove_tree(work)


@pytest.fixture(scope="session")
def debian_tarball() -> Path:
    """The cached minbase tarball, made (under a lock, against concurrent sessions) if
    missing."""
    CACHE_DIR.mkdir(mode=0o755, exist_ok=True)
    tarball = CACHE_DIR / f"{CACHE_KEY}.tar.zst"
    with open(CACHE_DIR / f".{CACHE_KEY}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in CACHE_DIR.glob(f".{CACHE_KEY}-building-*"):
            _remove_tree(stale)  # a killed build's: we hold the lock, nobody builds there
        if not tarball.exists():
            _make_tarball(tarball)
    return tarball


# -- the local package -------------------------------------------------------------------------

POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
  chown daemon:daemon /var/lib/ovf-demo/state
  chmod 0640 /var/lib/ovf-demo/state
  chown alice:staff /usr/lib/ovf-demo/shared
  chmod 2770 /usr/lib/ovf-demo/shared
  echo configured > /var/lib/ovf-demo/configured
  chown 4242:4343 /var/lib/ovf-demo/configured
fi
"""


def make_deb(dest: Path) -> Path:
    """A small arch-all package: a script, a setuid file, a conffile, a state file; its
    postinst gives files to daemon, alice (made by an earlier step) and unnamed IDs."""
    src = dest / "src"
    for d in ("DEBIAN", "usr/bin", "usr/lib/ovf-demo/shared", "var/lib/ovf-demo", "etc"):
        (src / d).mkdir(parents=True)
    (src / "DEBIAN/control").write_text(
        "Package: ovf-demo\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: overlayfuse tests <tests@example.invalid>\n"
        "Description: a package made by overlayfuse's tests\n"
        " Owners, modes and a setuid file for a rootless build to keep.\n")
    (src / "DEBIAN/postinst").write_text(POSTINST)
    (src / "DEBIAN/conffiles").write_text("/etc/ovf-demo.conf\n")
    (src / "usr/bin/ovf-demo").write_text("#!/bin/sh\necho ovf-demo\n")
    (src / "usr/lib/ovf-demo/helper").write_text("setuid helper\n")
    (src / "var/lib/ovf-demo/state").write_text("state\n")
    (src / "etc/ovf-demo.conf").write_text("key = value\n")
    os.chmod(src / "DEBIAN/postinst", 0o755)
    os.chmod(src / "usr/bin/ovf-demo", 0o755)
    os.chmod(src / "usr/lib/ovf-demo/helper", 0o4755)
    pkgs = dest / "pkgs"
    pkgs.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(src), str(pkgs / DEB)],
                   check=True, capture_output=True)
    os.chmod(pkgs / DEB, 0o644)
    os.chmod(pkgs, 0o755)
    return pkgs


# -- listings ----------------------------------------------------------------------------------

def parse_listing(text: str) -> dict[str, Entry]:
    """path -> ("d", mode, uid, gid) or (type, mode, uid, gid, size, link, sha256|None)."""
    out: dict[str, Entry] = {}
    hashes: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("D "):
            _, mode, uid, gid, path = line.split(" ", 4)
            out[path] = ("d", int(mode, 8), int(uid), int(gid))
        elif line.startswith("F "):
            _, kind, mode, uid, gid, size, rest = line.split(" ", 6)
            path, _, link = rest.partition("\t")
            out[path] = (kind, int(mode, 8), int(uid), int(gid), int(size), link, None)
        else:
            assert re.fullmatch(r"[0-9a-f]{64}  \./.*", line), f"unexpected line {line!r}"
            hashes[line[66:]] = line[:64]
    for path, digest in hashes.items():
        out[path] = out[path][:6] + (digest,)
    return out


def differences(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    """What differs between two listings, for an assertion message (the first 30)."""
    out = [f"{p}: {a.get(p)} != {b.get(p)}" for p in sorted(set(a) | set(b))
           if a.get(p) != b.get(p)]
    return out[:30] + ([f"... {len(out) - 30} more"] if len(out) > 30 else [])


def undated(tree: dict[str, Entry]) -> dict[str, Entry]:
    """``tree`` without the digests of the DATED files (see ``shadow_lines``)."""
    return {p: e[:6] + (None,) if p in DATED else e for p, e in tree.items()}


def shadow_lines(text: str) -> list[str]:
    """shadow entries with the day of the last password change masked."""
    fields = (line.split(":") for line in text.splitlines())
    return [":".join(f[:2] + ["DAY"] + f[3:]) for f in fields]


def host_id(inside: int, own: int) -> int:
    """Where the sandbox's inside ID lands on the host: 0 is the user, N the N-th
    subordinate ID (overlayfuse/sandbox/idmaps.py)."""
    return own if inside == 0 else SUB_START + inside - 1


def inside_id(host: int, own: int) -> int:
    if host == own:
        return 0
    assert SUB_START <= host < SUB_START + SUB_COUNT, f"host ID {host} is outside the map"
    return host - SUB_START + 1


# -- running -----------------------------------------------------------------------------------

def ok(r: subprocess.CompletedProcess[str], what: str) -> str:
    assert r.returncode == 0, f"{what}: status {r.returncode}\n{r.stderr[-3000:]}"
    return r.stdout


class Store:
    """``overlayfuse`` as the test user, its store in the user's home."""

    def __init__(self, user: Unprivileged) -> None:
        self.user = user
        self.base = user.home / "store"

    def ovf(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {"stdin": subprocess.DEVNULL} if input is None else {"input": input}
        return self.user.run([self.user.python, "-m", "overlayfuse", *args],
                             capture_output=True, text=True, timeout=TIMEOUT, **kw)

    def store(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.ovf("store", "--base", str(self.base), *args, input=input)

    def quiet(self, *args: str) -> str:
        """Housekeeping that works says nothing on stderr."""
        r = self.store(*args)
        assert r.returncode == 0 and r.stderr == "", f"store {' '.join(args)}: {r.stderr}"
        return r.stdout

    def listing(self) -> dict[str, Entry]:
        r = self.store("run", "-v", "--", "sh", "-c", LISTING, "sh", "/")
        out = ok(r, "listing through store run")
        assert "backend kernel-userns" in r.stderr, r.stderr
        return parse_listing(out)

    def layers(self) -> list[Path]:
        """The config's layer dirs, upper first (``store info``)."""
        text = ok(self.store("info"), "store info")
        ids = re.findall(r"^  ([0-9a-f]{16})  parent", text, re.M)
        assert ids, text
        return [self.base / "layers" / i for i in ids]


def chroot_steps(root: Path, pkgs: Path, steps: tuple[str, ...]) -> list[float]:
    """Each step as root in a plain chroot of ``root``: /proc and /dev mounted, the packages at
    /pkgs, in mount and PID namespaces of its own (the mounts go with the step)."""
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    (root / "pkgs").mkdir()
    script = ('mount -t proc proc "$1/proc" && mount --bind /dev "$1/dev" && '
              'mount --bind -o ro "$2" "$1/pkgs" && exec chroot "$1" /bin/sh -c "$3"')
    took = []
    try:
        for step in steps:
            started = time.monotonic()
            r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid",
                                "--fork", "sh", "-c", script, "sh", str(root), str(pkgs), step],
                               env=CLEAN_ENV, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=TIMEOUT)
            ok(r, f"chroot step {step!r}")
            took.append(time.monotonic() - started)
    finally:
        (root / "pkgs").rmdir()  # fails (loudly) while something is still mounted there
    assert not mounts_under(root), "the chroot's mounts outlived it"
    return took


def chroot_listing(root: Path) -> dict[str, Entry]:
    r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", LISTING, "sh", "/"],
                       env=CLEAN_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.stderr == "", r.stderr
    return parse_listing(ok(r, "listing in the chroot"))


def host_state(mark: str) -> dict[str, Any]:
    """What the steps would change on the host if they reached it (only these: concurrent test
    sessions may change other things in /etc and /tmp meanwhile)."""
    paths = [f"{d}/{mark}" for d in ("/tmp", "/etc", "/root")] + [
        "/home/alice", "/usr/bin/hello", "/usr/bin/ovf-demo", "/usr/lib/ovf-demo",
        "/var/lib/ovf-demo", "/etc/ovf-demo.conf", "/var/lib/dpkg/info/ovf-demo.list"]
    status = Path("/var/lib/dpkg/status").read_text()
    return {"exist": [p for p in paths if os.path.lexists(p)],
            "accounts": [ln for f in ("/etc/passwd", "/etc/group", "/etc/shadow")
                         for ln in Path(f).read_text().splitlines() if ln.startswith("alice:")],
            "dpkg": [p for p in ("hello", "ovf-demo") if f"Package: {p}\n" in status]}


def visible_to(user: Unprivileged, tree: dict[str, Entry]) -> set[str]:
    """The paths of ``tree`` (inside IDs) a ``find`` as the user lists through a mount that
    shows them with host IDs: every directory above must give the user read and search."""
    def lists(path: str) -> bool:
        kind, mode, uid, gid = tree[path][:4]
        huid, hgid = host_id(uid, user.uid), host_id(gid, user.gid)
        bits = (mode >> 6) if huid == user.uid else (mode >> 3) if hgid == user.gid else mode
        return kind == "d" and bits & 0o5 == 0o5

    return {p for p in tree
            if all(lists("/".join(p.split("/")[:n])) for n in range(1, p.count("/") + 1))}


def readable_by(user: Unprivileged, entry: Entry) -> bool:
    _, mode, uid, gid = entry[:4]
    if host_id(uid, user.uid) == user.uid:
        return bool(mode & 0o400)
    return bool(mode & (0o040 if host_id(gid, user.gid) == user.gid else 0o004))


@pytest.fixture
def subids(unprivileged: Unprivileged) -> Iterator[int]:
    with subordinate_ids(unprivileged.user, SUB_START, SUB_COUNT):
        yield SUB_START
    line = f"{unprivileged.user}:{SUB_START}:{SUB_COUNT}\n"
    for f in ("/etc/subuid", "/etc/subgid"):
        assert not os.path.exists(f) or line not in Path(f).read_text(), f"{f} kept our line"


def test_debian_root_rootless(unprivileged: Unprivileged, subids: int, debian_tarball: Path,
                              tmp_path: Path) -> None:
    user = unprivileged
    st = Store(user)
    pkgs = make_deb(user.home / "deb")
    chroot = tmp_path / "chroot"
    mark = f"ovf-leak-{uuid.uuid4().hex[:8]}"
    try:
        _rootless_and_chroot(user, st, pkgs, chroot, debian_tarball, mark)
    finally:
        shutil.rmtree(chroot, ignore_errors=True)  # 200 MiB: not left for pytest's tmp dirs
        for d in ("/tmp", "/etc", "/root"):  # what a leak left (the test failed then)
            if os.path.lexists(f"{d}/{mark}"):
                os.unlink(f"{d}/{mark}")


def _rootless_and_chroot(user: Unprivileged, st: Store, pkgs: Path, chroot: Path,
                         tarball: Path, mark: str) -> None:
    t0 = time.monotonic()
    # -- import -----------------------------------------------------------------------------
    r = st.store("init", "--from-tar", str(tarball))
    ok(r, "init --from-tar")
    assert re.search(r"imported \d+ entries, [\d.]+ MiB from .*; skipped \d+ device nodes",
                     r.stderr), r.stderr
    t_import = time.monotonic() - t0
    log.info("store init --from-tar took %.1f s: %s", t_import, r.stderr.strip())

    # -- the build, and nothing of it on the host --------------------------------------------
    nap = f"7391.{uuid.uuid4().int % 10**6:06d}"
    leak = f"touch /tmp/{mark} /etc/{mark} /root/{mark}"
    steps = (*STEPS, leak + f" && (sleep {nap} </dev/null >/dev/null 2>&1 &)")
    stepfile = user.home / "steps"
    stepfile.write_text("".join(s + "\n" for s in steps))
    before = host_state(mark)
    assert not any(mark in p for p in before["exist"]) and before["accounts"] == [], before
    t1 = time.monotonic()
    r = st.ovf("build", "--base", str(st.base), "--bind", f"{pkgs}:/pkgs:ro", "--tag", "built",
               str(stepfile))
    ok(r, "build")
    t_build = time.monotonic() - t1
    ran = re.findall(r"\[(\d+)/\d+\] ran +[0-9a-f]{12} +in ([\d.]+) s", r.stderr)
    assert len(ran) == len(steps), r.stderr
    log.info("build took %.1f s; steps: %s", t_build,
             ", ".join(f"{n}: {s} s" for n, s in ran))
    assert "Setting up ovf-demo (1.0)" in r.stdout and "Setting up hello" in r.stdout, r.stdout
    assert host_state(mark) == before, "a build step reached the host"
    left = subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True, text=True)
    assert left.stdout == "", f"a step's background process outlived it: {left.stdout}"

    # -- store shell: / is the tree ----------------------------------------------------------
    # (the host may be a Debian minbase too, with the same top level: alice's home, made by
    # a step, is what only the tree has)
    assert not os.path.exists("/home/alice")
    r = st.store("shell", input="pwd; ls /; test -d /home/alice && echo alice; id -u; "
                                "dpkg -l hello | tail -n 1\n")
    lines = ok(r, "store shell").splitlines()
    log.info("store shell printed: %s", " | ".join(lines))
    assert lines[0] == "/" and lines[-3:-1] == ["alice", "0"], lines
    assert lines[-1].startswith("ii  hello "), lines
    tree_top = lines[1:-3]
    assert "usr" in tree_top and "work" not in tree_top, tree_top

    # -- the same steps as root in a chroot of a copy ----------------------------------------
    chroot.mkdir()
    t2 = time.monotonic()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--zstd",
                    "-xpf", str(tarball), "-C", str(chroot)], check=True)
    took = chroot_steps(chroot, pkgs, (*STEPS, leak))
    log.info("chroot: extract and steps %.1f s (steps: %s)", time.monotonic() - t2,
             ", ".join(f"{t:.1f} s" for t in took))
    assert tree_top == sorted(os.listdir(chroot)), tree_top
    want = chroot_listing(chroot)
    got = st.listing()
    assert undated(got) == undated(want), "store build and chroot differ:\n" + "\n".join(
        differences(undated(got), undated(want)))
    shadows = ok(st.store("run", "--", "sh", "-c", "cat /etc/shadow; echo =; cat /etc/shadow-"),
                 "cat shadow").split("=\n")
    assert [shadow_lines(t) for t in shadows] == [
        shadow_lines((chroot / p).read_text()) for p in DATED], shadows
    # what the steps made, by name: owners are the inside IDs, as root's chroot has them
    alice = 1000
    assert want["./home/alice/notes"][:4] == ("f", 0o644, alice, alice)
    assert want["./usr/lib/ovf-demo/helper"][:4] == ("f", 0o4755, 0, 0)
    assert want["./usr/lib/ovf-demo/shared"][:4] == ("d", 0o2770, alice, 50)
    assert want["./var/lib/ovf-demo/state"][:4] == ("f", 0o640, 1, 1)
    assert want["./var/lib/ovf-demo/configured"][:4] == ("f", 0o644, 4242, 4343)
    assert want["./usr/bin/hello"][:2] == ("f", 0o755)
    assert f"./etc/{mark}" in want and f"./root/{mark}" in want
    passwd = (chroot / "etc/passwd").read_text()
    assert "alice:x:1000:1000::/home/alice:/bin/sh\n" in passwd, passwd

    # -- on the host the layers hold the subordinate IDs -------------------------------------
    layers = st.layers()
    for path, entry in got.items():
        on_disk = next((layer / path for layer in layers if os.path.lexists(layer / path)),
                       None)
        assert on_disk is not None, f"{path} is in no layer"
        s = on_disk.lstat()
        assert (s.st_uid, s.st_gid) == (host_id(entry[2], user.uid),
                                        host_id(entry[3], user.gid)), (path, entry, on_disk)
    notes = next(la for la in layers if (la / "home/alice/notes").exists()) / "home/alice/notes"
    assert (notes.stat().st_uid, notes.stat().st_gid) == (SUB_START + 999, SUB_START + 999)

    # -- the FUSE backend: store mount, as the user ------------------------------------------
    t3 = time.monotonic()
    _check_store_mount(user, st, got)
    log.info("store mount (fuse) walk took %.1f s", time.monotonic() - t3)

    # -- snapshot, a change, rollback --------------------------------------------------------
    st.quiet("snapshot", "s1")
    ok(st.store("run", "--", "sh", "-c", "dpkg -r hello && echo changed > /home/alice/notes "
                "&& userdel alice"), "a change")
    out = ok(st.store("run", "--", "sh", "-c",
                      "cat /home/alice/notes; test -e /usr/bin/hello || echo gone; "
                      "grep -c ^alice: /etc/passwd || true"), "after the change")
    assert out.split() == ["changed", "gone", "0"], out
    st.quiet("rollback", "s1")
    after = st.listing()
    assert after == got, "rollback:\n" + "\n".join(differences(after, got))

    # -- housekeeping as the user leaves nothing ---------------------------------------------
    _housekeeping(user, st)
    log.info("whole test %.1f s", time.monotonic() - t0)


def _check_store_mount(user: Unprivileged, st: Store, tree: dict[str, Entry]) -> None:
    """``store mount`` as the user serves the same tree through FUSE, owners as the host's
    subordinate IDs; what the user may not list or read outside the namespace stays closed."""
    mnt = user.home / "mnt"
    mnt.mkdir()
    user.chown(mnt)
    r = st.store("mount", "-v", str(mnt))
    ok(r, "store mount")
    try:
        assert f"mounted default on {mnt} (fuse)" in r.stderr, r.stderr
        seen = user.run(["sh", "-c", LISTING, "sh", str(mnt)], capture_output=True, text=True,
                        timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    finally:
        ok(st.store("umount", str(mnt)), "store umount")
    fuse = parse_listing(seen.stdout)
    visible = visible_to(user, tree)
    assert set(fuse) == visible, sorted(set(fuse) ^ visible)[:20]
    assert len(visible) > 0.9 * len(tree)
    mapped = {}
    for path, (kind, mode, uid, gid, *rest) in fuse.items():
        entry = (kind, mode, inside_id(uid, user.uid), inside_id(gid, user.gid), *rest)
        if kind == "f" and not readable_by(user, tree[path]):
            assert entry[6] is None, f"{path} read through FUSE against its mode"
            entry = entry[:6] + (tree[path][6],)
        mapped[path] = entry
    want = {p: tree[p] for p in visible}
    assert mapped == want, "store mount and store run differ:\n" + "\n".join(
        differences(mapped, want))
    # by name: alice's file as her subordinate ID; daemon's 0640 file closed to the user
    assert fuse["./home/alice/notes"][2:4] == (SUB_START + 999, SUB_START + 999)
    assert fuse["./home/alice/notes"][6] == tree["./home/alice/notes"][6] is not None
    assert fuse["./var/lib/ovf-demo/state"][1:4] == (0o640, SUB_START, SUB_START)
    assert fuse["./var/lib/ovf-demo/state"][6] is None
    assert fuse["./usr/lib/ovf-demo/helper"][1:4] == (0o4755, user.uid, user.gid)
    log.info("store mount: %d of %d entries listable by %s, %d files unreadable", len(fuse),
             len(tree), user.user, sum(1 for e in fuse.values() if e[0] == "f" and e[6] is None))


def _housekeeping(user: Unprivileged, st: Store) -> None:
    """remove-snapshot, clean, gc, scrub as the user: no layer, no leftover, the store dir
    removable by the user with plain rm; no mount, no process of this store."""
    holder = next(la for la in st.layers() if (la / "home/alice/notes").exists())
    r = user.run(["rm", "-f", str(holder / "home/alice/notes")], capture_output=True,
                 text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, \
        "precondition: the layers hold files the user cannot remove from outside"
    st.quiet("remove-snapshot", "s1")
    st.quiet("remove-snapshot", "built")
    st.quiet("clean")
    st.quiet("gc")
    live = {p.name for p in st.layers()}
    assert set(os.listdir(st.base / "layers")) == live
    assert os.listdir(st.base / "tmp") == [] and os.listdir(st.base / "work") == []
    st.quiet("scrub")
    assert st.quiet("gc") == "gc: 0 layers kept, 0 dirs and 0 leftovers removed\n"
    for d in ("layers", "tmp", "work"):
        assert os.listdir(st.base / d) == [], d
    ok(user.run(["rm", "-rf", str(st.base)], capture_output=True, text=True), "rm -rf")
    assert not st.base.exists()
    assert not mounts_under(user.home)
    ps = subprocess.run(["pgrep", "-af", str(user.home)], capture_output=True, text=True)
    assert ps.stdout == "", ps.stdout
