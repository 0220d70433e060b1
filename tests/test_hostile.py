"""Hostile layers: content made to attack the daemon gets the kernel's answers, and no crash.

Redirects that point out of the layer (``../../etc``, ``/../../etc``) or at the directory
itself, an origin xattr of garbage, names with a newline or invalid UTF-8, and a path of more
than 4095 bytes below the mount point.  Every entry of the merged tree is listed, stat'ed and
read through directory descriptors (the long path is never spelled out) on a kernel overlay
and on overlayfuse over the same layers: the outcomes must agree, nothing outside the layers
may show, and the daemon must still serve afterwards.

Then the work dir's hard-link index made hostile (a symlink out or in a loop, garbage entry
names, entries pointing nowhere, dirs and symlinks where files belong), character devices
that are not whiteouts (1:3, 5:0, 0:1), and a lower dir of a million entries (slow;
``OVERLAYFUSE_HUGE_DIR`` sets the count, 200,000 by default and the million in .ci/run).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mounts import kernel_overlay, make_layers, overlayfuse_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs and kernel "
                                "overlays need root")

SECRET = b"outside the layers\n"
LONG = "L" * 250


def build(root: Path) -> tuple[list[Path], Path]:
    """Lowers and upper under ``root``; a file beside them that must never show."""
    layers = make_layers(root)
    (root / "etc").mkdir()
    (root / "etc" / "secret").write_bytes(SECRET)
    low, upper = layers.lowers[1], layers.upper
    (low / "victim").mkdir()
    (low / "victim" / "inside").write_bytes(b"lower victim\n")
    for name, redirect in (("out_rel", b"../../etc"), ("out_abs", b"/../../etc"),
                           ("self_abs", b"/self_abs"), ("self_rel", b"self_rel"),
                           ("dotdot", b".."), ("deep", b"/victim/../../etc")):
        (upper / name).mkdir()
        os.setxattr(upper / name, "trusted.overlay.redirect", redirect)
    (low / "self_abs").mkdir()
    (low / "self_abs" / "kept").write_bytes(b"self redirect\n")
    (upper / "garbage").write_bytes(b"upper file\n")
    os.setxattr(upper / "garbage", "trusted.overlay.origin", b"\x00\xfbgarbage" * 7)
    (upper / "garbage_dir").mkdir()
    os.setxattr(upper / "garbage_dir", "trusted.overlay.origin", b"\xff" * 3)
    for name in (b"new\nline", b"bad\xff\xfeutf8", b"tab\tand space"):
        with open(os.fsencode(low) + b"/" + name, "wb") as f:
            f.write(name)
    fd = os.open(low, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(17):  # 17 * 251 bytes: a path longer than PATH_MAX below the root
        os.mkdir(LONG, dir_fd=fd)
        nxt = os.open(LONG, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep down\n")
    os.close(fd)
    return layers.lowers, upper


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def walk(mnt: Path) -> dict[bytes, Any]:
    """Every entry's (type, size, content digest) or errno, reached by dir fds only."""
    out: dict[bytes, Any] = {}

    def visit(dirfd: int, rel: bytes) -> None:
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(dirfd))
        except OSError as e:
            out[rel + b"/"] = _err(e)
            return
        for name in names:
            path = rel + b"/" + name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError as e:
                out[path] = _err(e)
                continue
            if stat.S_ISDIR(st.st_mode):
                out[path] = "d"
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                  dir_fd=dirfd)
                except OSError as e:
                    out[path] = ("d", _err(e))
                    continue
                try:
                    visit(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                    with open(fd, "rb") as f:
                        data = f.read()
                    out[path] = ("f", st.st_size, hashlib.sha256(data).hexdigest()[:16])
                    assert data != SECRET, f"{path!r} shows a file from outside the layers"
                except OSError as e:
                    out[path] = ("f", _err(e))
            else:
                out[path] = stat.S_IFMT(st.st_mode)

    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        visit(root, b"")
    finally:
        os.close(root)
    return out


def test_hostile_layers_answer_like_the_kernel(tmp_path: Path) -> None:
    k_lowers, k_upper = build(tmp_path / "k")
    f_lowers, f_upper = build(tmp_path / "f")
    k, f = tmp_path / "k", tmp_path / "f"
    with kernel_overlay(k_lowers, k_upper, k / "work", k / "mnt"):
        kernel = walk(k / "mnt")
    with overlayfuse_mount(f_lowers, f_upper, f / "work", f / "mnt") as dm:
        ours = walk(f / "mnt")
        assert dm.alive(), "the daemon died"
        assert sorted(os.listdir(f / "mnt"))  # and still serves
    _assert_plain_stderr(dm.stderr())
    assert b"/" + b"/".join([LONG.encode()] * 17) + b"/bottom" in kernel
    diffs = [f"{p!r}: kernel {kernel.get(p)!r} overlayfuse {ours.get(p)!r}"
             for p in sorted(set(kernel) | set(ours)) if kernel.get(p) != ours.get(p)]
    assert not diffs, "\n".join(diffs)


# ---------------------------------------------------------------------------------------------
# the work dir's index, and whiteouts of the wrong device

MODES = {"default": (), "zero_opens": ("zero_opens",)}


def _canary(root: Path) -> Path:
    out = root / "outside"
    out.mkdir()
    (out / "canary").write_bytes(SECRET)
    return out


def _outside_intact(out: Path) -> None:
    assert sorted(os.listdir(out)) == ["canary"], "something was made outside the layers"
    assert (out / "canary").read_bytes() == SECRET


def _mount_outcome(system: str, root: Path, extra: tuple[str, ...] = ()) -> Any:
    """``index_ops`` on the mount of the layers under ``root``, or "refused" when the mount
    never came up: mount(8) of the kernel's overlay failed, or the daemon exited non-zero
    before mounting with one ``overlayfuse:`` line.  A mount that came up and then failed
    (its teardown too) is no refusal; the daemon's stderr holds no traceback either way."""
    from mounts import MountError
    lowers = [root / "lower0", root / "lower1"]
    mounted = False
    try:
        if system == "kernel":
            with kernel_overlay(lowers, root / "upper", root / "work", root / "mnt") as m:
                mounted = True
                return index_ops(m)
        with overlayfuse_mount(lowers, root / "upper", root / "work", root / "mnt",
                               extra) as dm:
            mounted = True
            res = index_ops(root / "mnt")
            assert dm.alive() and sorted(os.listdir(root / "mnt")), "the daemon died"
    except MountError as e:
        if mounted:
            raise  # it mounted a hostile index, then failed: not the refusal it must be
        if system != "kernel":
            _assert_refused_at_setup(e, root)
        return "refused"
    _assert_plain_stderr(dm.stderr())
    return res


def _assert_plain_stderr(text: str) -> None:
    """The daemon spoke only in ``overlayfuse:`` lines: no traceback, no stray output."""
    assert "Traceback" not in text, f"the daemon crashed:\n{text}"
    stray = [ln for ln in text.splitlines() if not ln.startswith("overlayfuse: ")]
    assert not stray, f"daemon stderr not in overlayfuse: lines:\n{text}"


def _assert_refused_at_setup(e: Exception, root: Path) -> None:
    """The daemon exited with a non-zero status before the mount came up (not a hang, not a
    mount that failed later), saying why in exactly one ``overlayfuse:`` line."""
    import re
    status = re.search(r"exited with status (-?\d+) before mounting", str(e))
    assert status and int(status[1]) > 0, f"not a refusal at setup: {e}"
    logs = sorted(root.glob(f".{(root / 'mnt').name}.overlayfuse.*.log"))
    assert len(logs) == 1, f"one daemon log expected under {root}: {logs}"
    text = logs[0].read_text(errors="replace")
    _assert_plain_stderr(text)
    assert len(text.splitlines()) == 1, f"a refusal is one overlayfuse: line:\n{text}"


def index_ops(m: Path) -> dict[str, Any]:
    from helpers import outcome

    def st(n: str) -> Any:
        s = os.lstat(m / n)
        return (stat.filemode(s.st_mode), s.st_nlink)

    r: dict[str, Any] = {"ls": outcome(lambda: sorted(os.listdir(m)))}
    for n in ("a", "a2", "c", "c2", "b"):
        r["read " + n] = outcome(lambda: (m / n).read_bytes())
        r["stat " + n] = outcome(st, n)
    r["append c"] = outcome(lambda: open(m / "c", "ab").write(b"x") and None)
    r["read c2 after"] = outcome(lambda: (m / "c2").read_bytes())
    r["same c"] = outcome(lambda: os.stat(m / "c").st_ino == os.stat(m / "c2").st_ino)
    return r


def _index_layers(root: Path) -> tuple[Path, str, str]:
    """Lowers with two hard-linked pairs; ``a`` copied up by the kernel (so it has an index
    entry); returns the index dir and the index names of ``a`` and of ``c`` (not copied)."""
    from overlayfuse.fusefs import origin
    layers = make_layers(root)
    low = layers.lowers[0]
    for n in ("a", "c"):
        (low / n).write_bytes(n.encode() + b"\n")
        os.link(low / n, low / (n + "2"))
    (low / "b").write_bytes(b"b\n")
    with kernel_overlay(layers.lowers, layers.upper, layers.work, layers.mnt):
        with open(layers.mnt / "a", "ab") as f:
            f.write(b"up\n")
    fd = os.open(low, os.O_PATH)
    try:
        a, c = (origin.index_name(origin.encode(fd, n, origin.fs_uuid(fd)) or b"").decode()
                for n in (b"a", b"c"))
    finally:
        os.close(fd)
    idx = layers.work / "index"
    assert sorted(os.listdir(idx)) == [a], "the kernel's copy-up made no index entry"
    return idx, a, c


INDEX_TRAPS = {
    # the index dir itself is no directory: the kernel refuses the mount (ENOTDIR)
    "index-symlink-out": lambda idx, a, c, out: (os.rename(idx, idx.parent / "old"),
                                                 os.symlink(out, idx)),
    "index-symlink-loop": lambda idx, a, c, out: (os.rename(idx, idx.parent / "old"),
                                                  os.symlink("index", idx)),
    "index-symlink-loop2": lambda idx, a, c, out: (os.rename(idx, idx.parent / "old"),
                                                   os.symlink("x", idx),
                                                   os.symlink("index", idx.parent / "x")),
    "index-is-file": lambda idx, a, c, out: (os.rename(idx, idx.parent / "old"),
                                             idx.write_bytes(b"")),
    # entries that are no file handle: EINVAL, the mount is refused
    "garbage-name": lambda idx, a, c, out: (idx / "zzzz").write_bytes(b""),
    "garbage-hex": lambda idx, a, c, out: (idx / ("00fb" + "ab" * 30)).write_bytes(b""),
    "garbage-dir": lambda idx, a, c, out: (idx / "zzzz").mkdir(),
    "garbage-symlink": lambda idx, a, c, out: os.symlink(out, idx / "zzzz"),
    # a good name on an entry without origin: ENODATA, refused
    "entry-file-no-origin": lambda idx, a, c, out: (idx / c).write_bytes(b"planted\n"),
    "entry-symlink-out": lambda idx, a, c, out: os.symlink(out / "canary", idx / c),
    "entry-symlink-loop": lambda idx, a, c, out: os.symlink(c, idx / c),
    # mounts: a dir where c's entry goes is EIO for c; another file's entry is stale
    "entry-dir": lambda idx, a, c, out: (idx / c).mkdir(),
    "entry-of-another-file": lambda idx, a, c, out: os.link(idx / a, idx / c),
    "entry-whiteout": lambda idx, a, c, out: os.mknod(idx / c, stat.S_IFCHR | 0o600, 0),
    "leftover-temp": lambda idx, a, c, out: (idx / "#1f").write_bytes(b""),
    # pointing nowhere: the origin is gone, or the upper names are
    "origin-gone": lambda idx, a, c, out: (os.unlink(idx.parents[1] / "lower0" / "a"),
                                           os.unlink(idx.parents[1] / "lower0" / "a2")),
    "orphan": lambda idx, a, c, out: os.unlink(idx.parents[1] / "upper" / "a"),
}


@pytest.mark.parametrize("trap", sorted(INDEX_TRAPS))
def test_hostile_index(tmp_path: Path, trap: str) -> None:
    """A planted work/index (a symlink out or in a loop, a file) or planted index entries
    (garbage names, entries pointing nowhere, a dir, a symlink, another file's entry): the
    mount is refused where the kernel refuses it, else every answer is the kernel's; nothing
    outside the layers is touched and the daemon keeps serving."""
    results = {}
    for system, extra in (("kernel", ()), *((f"overlayfuse {m}", e) for m, e in MODES.items())):
        root = tmp_path / system.replace(" ", "-")
        root.mkdir()
        out = _canary(root)
        idx, a, c = _index_layers(root)
        INDEX_TRAPS[trap](idx, a, c, out)
        results[system] = _mount_outcome(system.split()[0], root, extra)
        _outside_intact(out)
        if trap.startswith("index-"):
            assert os.path.islink(idx) or idx.is_file(), "the planted index was replaced"
    kernel = results.pop("kernel")
    for system, ours in results.items():
        assert ours == kernel, f"{system}: {ours!r}\nkernel: {kernel!r}"


def _wrong_whiteouts(root: Path) -> list[Path]:
    """Character devices that look like whiteouts but are not 0/0: the kernel shows them as
    the devices they are, hiding nothing."""
    layers = make_layers(root)
    up, l0, l1 = layers.upper, layers.lowers[0], layers.lowers[1]
    for n in ("f", "g", "h"):
        (l1 / n).write_bytes(b"lower " + n.encode() + b"\n")
    (l1 / "d").mkdir()
    (l1 / "d" / "in").write_bytes(b"in d\n")
    os.mknod(up / "f", stat.S_IFCHR | 0o666, os.makedev(1, 3))   # /dev/null over a file
    os.mknod(up / "d", stat.S_IFCHR | 0o600, os.makedev(5, 0))   # /dev/tty over a dir
    os.mknod(l0 / "g", stat.S_IFCHR | 0o666, os.makedev(1, 3))   # in a lower, over a file
    os.mknod(up / "h", stat.S_IFCHR | 0o600, os.makedev(0, 1))   # minor 1 only
    os.mknod(l0 / "n", stat.S_IFCHR | 0o666, os.makedev(1, 3))   # over nothing
    return layers.lowers


def whiteout_ops(m: Path) -> dict[str, Any]:
    from helpers import outcome

    def st(n: str) -> Any:
        s = os.lstat(m / n)
        return (stat.filemode(s.st_mode), os.major(s.st_rdev), os.minor(s.st_rdev))

    r: dict[str, Any] = {"ls": sorted(os.listdir(m))}
    for n in ("f", "d", "g", "h", "n"):
        r["stat " + n] = outcome(st, n)
    r["ls d"] = outcome(os.listdir, m / "d")
    r["stat d/in"] = outcome(os.lstat, m / "d" / "in")
    r["read f"] = outcome(lambda: (m / "f").read_bytes())
    r["write g"] = outcome(lambda: (m / "g").write_bytes(b"into the device") and None)
    r["chmod n"] = outcome(os.chmod, m / "n", 0o640)
    r["unlink f"] = outcome(os.unlink, m / "f")
    r["unlink g"] = outcome(os.unlink, m / "g")
    r["rename h"] = outcome(os.rename, m / "h", m / "h2")
    r["rm d"] = outcome(os.unlink, m / "d")
    r["mkdir d"] = outcome(os.mkdir, m / "d")
    r["ls d after"] = outcome(os.listdir, m / "d")
    r["ls after"] = sorted(os.listdir(m))
    return r


@pytest.mark.parametrize("mode", sorted(MODES))
def test_whiteout_of_the_wrong_device(tmp_path: Path, mode: str) -> None:
    """A character device 1:3, 5:0 or 0:1 where a whiteout (0:0) would be, in the upper and
    in a lower: no whiteout, a plain device in the merged tree, as the kernel shows it; the
    lower entries below it stay hidden as below any other non-directory."""
    res = {}
    for system in ("kernel", "overlayfuse"):
        root = tmp_path / system
        lowers = _wrong_whiteouts(root)
        up, work, mnt = root / "upper", root / "work", root / "mnt"
        if system == "kernel":
            with kernel_overlay(lowers, up, work, mnt):
                res[system] = whiteout_ops(mnt)
        else:
            with overlayfuse_mount(lowers, up, work, mnt, MODES[mode]) as dm:
                res[system] = whiteout_ops(mnt)
                assert dm.alive() and os.listdir(mnt), "the daemon died"
            _assert_plain_stderr(dm.stderr())
    assert res["kernel"]["stat f"][0][0] == "c" and res["kernel"]["stat f"][1:] == (1, 3)
    assert res["overlayfuse"] == res["kernel"]


# ---------------------------------------------------------------------------------------------
# a directory with a million entries

# .ci/run lists the million; the default suite 200,000 (still 4x what the daemon's
# name caches keep, so an oversized dir's paths run: minutes per million on 2 loaded cores)
MILLION = int(os.environ.get("OVERLAYFUSE_HUGE_DIR", "200000"))
RSS_LIMIT_MB = 1536  # the kernel holds a lookup of every entry listed; names and nodes stay


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def _listing_digest(d: Path) -> tuple[int, str]:
    """How many names and a digest of them all, without holding a million names twice."""
    names = sorted(os.fsencode(e.name) for e in os.scandir(d))
    return len(names), hashlib.sha256(b"\0".join(names)).hexdigest()


def _huge_ops(m: Path) -> dict[str, Any]:
    from helpers import outcome
    huge = m / "huge"
    return {"list": _listing_digest(huge),
            "stat middle": outcome(lambda: os.lstat(huge / f"f{MILLION // 2:07d}").st_size),
            "stat last": outcome(lambda: os.lstat(huge / f"f{MILLION - 1:07d}").st_size),
            "stat whited out": outcome(os.lstat, huge / "f0000000"),
            "stat absent": outcome(os.lstat, huge / "nothing"),
            "read upper": outcome(lambda: (huge / "new").read_bytes()),
            "create": outcome(lambda: (huge / "made").write_bytes(b"m") and None),
            "list again": _listing_digest(huge)[0]}


@pytest.mark.slow
def test_directory_with_a_million_entries(tmp_path: Path) -> None:
    """A lower dir of a million files under an upper dir that whites one out and adds one:
    listed through the merge and looked up in, the daemon (both modes) gives the kernel's
    answers, without re-reading the dir for each READDIR, in bounded memory."""
    import subprocess
    import time
    from mounts import force_unmount
    fast = tmp_path / "tmpfs"  # a million creates on a loaded disk take many minutes
    fast.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,nr_inodes=2500000,mode=0755",
                    "ovf-huge", str(fast)], check=True)
    try:
        lower = fast / "lower"
        (lower / "huge").mkdir(parents=True)
        fd = os.open(lower / "huge", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(MILLION):
                os.close(os.open(f"f{i:07d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        finally:
            os.close(fd)
        results, peaks, times = {}, {}, {}
        for system, extra in (("kernel", ()), *((f"overlayfuse {m}", e)
                                                 for m, e in MODES.items())):
            root = tmp_path / system.replace(" ", "-")
            for d in ("upper/huge", "work", "mnt"):
                (root / d).mkdir(parents=True)
            os.mknod(root / "upper/huge/f0000000", stat.S_IFCHR | 0o600, 0)
            (root / "upper/huge/new").write_bytes(b"upper\n")
            t = time.monotonic()
            if system == "kernel":
                with kernel_overlay([lower], root / "upper", root / "work", root / "mnt") as m:
                    results[system] = _huge_ops(m)
            else:
                with overlayfuse_mount([lower], root / "upper", root / "work", root / "mnt",
                                       extra) as dm:
                    results[system] = _huge_ops(root / "mnt")
                    peaks[system] = _peak_rss_mb(dm.pid)
                    assert dm.alive() and os.listdir(root / "mnt"), "the daemon died"
            times[system] = time.monotonic() - t
    finally:
        force_unmount(fast)
    print(f"million entries: seconds {times}, daemon peak RSS MB {peaks}")
    assert results["kernel"]["list"][0] == MILLION  # one whited out, one added
    assert results["kernel"]["list again"] == MILLION + 1
    for system, peak in peaks.items():
        assert results[system] == results["kernel"], system
        assert peak < RSS_LIMIT_MB, f"{system}: peak RSS {peak:.0f} MB"
