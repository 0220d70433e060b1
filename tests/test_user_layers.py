"""One set of layers, one tree: whoever wrote them, ``auto`` never shows them otherwise.

A normal user's FUSE mount renames lower directories (a ``redirect``) and keeps hard links
through copy-up (the index), which a kernel mount with ``userxattr`` cannot read; the upper's
record (``user.overlay.ovf.features``) says so, and ``auto`` then takes FUSE for ``run`` too.
The other way round, what the kernel wrote in a user namespace (its work dir left at mode 000)
must mount through FUSE.  And as root, a user's layers (``user.overlay.*``) and layers FUSE
wrote with an index mount through the kernel with the options that read them.

The generated sequences run twice: the same examples every run (derandomized,
OVF_USER_EXAMPLES, default 10 each) and, marked slow, new ones each session
(OVERLAYFUSE_USER_RANDOM_EXAMPLES, default 3 each, .ci/run sets more; OVF_RANDOM_SEED repeats
a session's draw).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mounts import diff_trees, kernel_overlay, overlayfuse_mount, tree_snapshot, wait_gone
from ops import random_run, seed_note
from unpriv import Unprivileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged runner needs root")

HERE = Path(__file__).resolve().parent
BACKEND_RE = re.compile(r"^overlayfuse: backend (\S+)", re.M)


# -- the user's side ----------------------------------------------------------------------------

def _lower(root: Path) -> Path:
    """A lower with directories to rename and files with two names."""
    low = root / "l"
    (low / "d1/sub").mkdir(parents=True)
    (low / "d1/f").write_text("hi\n")
    (low / "d1/sub/x").write_text("x\n")
    (low / "e").mkdir()
    (low / "e/y").write_text("y\n")
    (low / "g").write_text("old\n")
    os.link(low / "g", low / "g2")
    (low / "h").write_text("h\n")
    os.link(low / "h", low / "d1/h2")
    return low


class UserLayers:
    """A lower, an upper and a work dir owned by the user, and ways to use them as it."""

    def __init__(self, u: Unprivileged, base: Path, lower: Path | None = None) -> None:
        self.u = u
        base.mkdir(parents=True)
        self.base = base
        self.lower = lower or _lower(base)
        self.upper, self.work, self.mnt = base / "u", base / "w", base / "m"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        script = u.home / "user_ops.py"
        if not script.exists():
            shutil.copy(HERE / "user_ops.py", script)
            os.chmod(script, 0o644)
        self.script = script
        for d, dirs, files in os.walk(base):
            for n in [".", *dirs, *files]:
                os.lchown(os.path.join(d, n), u.uid, u.gid)

    @property
    def opts(self) -> str:
        return f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"

    def ovf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = self.u.run_as_user([self.u.python, "-m", "overlayfuse", *args], capture_output=True,
                               text=True, timeout=120)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def run(self, ops: list[Any], backend: str = "auto") -> tuple[str, dict[str, Any]]:
        """Apply ``ops`` in ``overlayfuse run`` as the user: (backend used, result)."""
        n = len(list(self.base.glob("ops*.json")))
        path = self.base / f"ops{n}.json"
        path.write_text(json.dumps(ops))
        os.chmod(path, 0o644)
        r = self.ovf("run", "-v", "--backend", backend, "-o", self.opts, "--",
                     self.u.python, str(self.script), str(path))
        used = BACKEND_RE.search(r.stderr)
        assert used, r.stderr
        return used.group(1), json.loads(r.stdout)


# -- operations ---------------------------------------------------------------------------------

NAMES = ("d1", "d2", "e", "d1/sub", "d1/f", "d1/h2", "g", "g2", "h", "e/y", "n", "e/n", "d2/f")
FILES = ("d1/f", "d1/h2", "g", "g2", "h", "e/y", "d1/sub/x", "n", "d2/f")
TEXT = st.sampled_from(("new\n", "more\n", ""))

OPERATION = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(FILES), TEXT),
    st.tuples(st.just("create"), st.sampled_from(("n", "e/n", "d1/n", "d2/n")), TEXT),
    st.tuples(st.just("truncate"), st.sampled_from(FILES)),
    st.tuples(st.just("mkdir"), st.sampled_from(("n", "d2", "e/n", "d1/sub/m"))),
    st.tuples(st.just("unlink"), st.sampled_from(FILES)),
    st.tuples(st.just("rmdir"), st.sampled_from(("d1/sub", "e", "d2", "n"))),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(("d1", "e", "d1/sub")),
              st.sampled_from(("d2", "e/d", "n", "d1/sub2"))),
    st.tuples(st.just("link"), st.sampled_from(FILES), st.sampled_from(("n", "e/l", "d1/l"))),
    st.tuples(st.just("symlink"), st.just("g"), st.sampled_from(("n", "e/s"))),
    st.tuples(st.just("chmod"), st.sampled_from(("g", "e/y")), st.sampled_from((0o600, 0o755))),
    # dirs keep their search bit: a non-root daemon cannot stat inside a dir it may not search,
    # where the kernel still lists the names
    st.tuples(st.just("chmod"), st.sampled_from(("d1", "e")), st.sampled_from((0o700, 0o755))),
).map(list)

USER_SETTINGS = settings(
    max_examples=int(os.environ.get("OVF_USER_EXAMPLES", "10")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    report_multiple_bugs=False,
)
# the randomised runs (slow): a new seed each session, OVERLAYFUSE_USER_RANDOM_EXAMPLES each
RANDOM_BUDGET = "OVERLAYFUSE_USER_RANDOM_EXAMPLES"
RANDOM_RUN = random_run(RANDOM_BUDGET, 3, HealthCheck.function_scoped_fixture)
OPERATIONS = st.lists(OPERATION, min_size=1, max_size=12)

_examples = iter(range(10**6))


@USER_SETTINGS
@given(ops=OPERATIONS)
def test_fuse_written_layers_read_the_same_through_auto(unprivileged: Unprivileged,
                                                        ops: list[Any]) -> None:
    """Written by FUSE as the user, read by ``run`` with ``auto``: the same tree; where the
    upper holds what kernel-userns cannot read, ``auto`` took FUSE, elsewhere the kernel."""
    check_fuse_written(unprivileged, ops)


@pytest.mark.slow
@RANDOM_RUN
@given(ops=OPERATIONS)
def test_fuse_written_layers_random(unprivileged: Unprivileged, ops: list[Any]) -> None:
    """The same on sequences no earlier run drew."""
    with seed_note(RANDOM_BUDGET):
        check_fuse_written(unprivileged, ops)


def check_fuse_written(u: Unprivileged, ops: list[Any]) -> None:
    """The check of both FUSE-written runs, on layers of its own."""
    ly = UserLayers(u, u.home / f"f{next(_examples)}")
    used, wrote = ly.run(ops, backend="fuse")
    assert used == "fuse"
    used, read = ly.run([])
    assert diff_trees(wrote["tree"], read["tree"]) == [], (used, ops)
    record = _record(ly.upper)
    # the hand-over: only what kernel-userns cannot read keeps auto on FUSE
    assert used == ("fuse" if {"redirect", "index"} & record else "kernel-userns"), (record, ops)
    # the record never claims less than the upper holds
    assert _holds(ly) <= record, ops


@USER_SETTINGS
@given(ops=OPERATIONS)
def test_kernel_userns_written_layers_read_the_same_through_fuse(unprivileged: Unprivileged,
                                                                 ops: list[Any]) -> None:
    """Written by the kernel in a user namespace, read by FUSE (as ``mount`` picks it for a
    user) and by ``auto``: the same tree as the kernel's own next mount shows (within the mount
    that made a hard link, the kernel may report the name it copied up with its lower inode
    number); the kernel's mode-000 work dir is no obstacle."""
    check_kernel_written(unprivileged, ops)


@pytest.mark.slow
@RANDOM_RUN
@given(ops=OPERATIONS)
def test_kernel_userns_written_layers_random(unprivileged: Unprivileged, ops: list[Any]) -> None:
    """The same on sequences no earlier run drew."""
    with seed_note(RANDOM_BUDGET):
        check_kernel_written(unprivileged, ops)


def check_kernel_written(u: Unprivileged, ops: list[Any]) -> None:
    """The check of both kernel-written runs, on layers of its own."""
    ly = UserLayers(u, u.home / f"k{next(_examples)}")
    used, _wrote = ly.run(ops, backend="kernel-userns")
    assert used == "kernel-userns"
    _, reference = ly.run([], backend="kernel-userns")
    for backend in ("fuse", "auto"):
        used, read = ly.run([], backend=backend)
        assert diff_trees(reference["tree"], read["tree"]) == [], (backend, used, ops)


def _record(upper: Path) -> set[str]:
    try:
        value = os.getxattr(upper, "user.overlay.ovf.features")
    except OSError:
        return set()
    return {w for w in value.decode().split(",") if w}


def _holds(ly: UserLayers) -> set[str]:
    """What the upper really holds, found by walking it (what the record spares readers)."""
    held = set()
    for d, dirs, files in os.walk(ly.upper):
        for n in dirs:
            if "user.overlay.redirect" in os.listxattr(os.path.join(d, n), follow_symlinks=False):
                held.add("redirect")
    if any((ly.work / "index").iterdir()) if (ly.work / "index").is_dir() else False:
        held.add("index")
    return held


# -- the commands, as a user types them ---------------------------------------------------

def test_user_commands_show_one_tree_with_auto_at_every_step(unprivileged: Unprivileged) -> None:
    u = unprivileged
    ly = UserLayers(u, u.home / "issue")
    r = ly.ovf("mount", "-v", "-o", ly.opts, str(ly.mnt))
    assert "backend fuse" in r.stderr
    try:
        sh = u.run_as_user(["sh", "-c", "mv m/d1 m/d2 && echo new >> m/g"], cwd=str(ly.base),
                           capture_output=True, text=True)
        assert sh.returncode == 0, sh.stderr
    finally:
        ly.ovf("umount", str(ly.mnt))
    r = ly.ovf("run", "-v", "-o", ly.opts, "--", "sh", "-c", "ls; ls d2; cat g2")
    assert r.stdout.split() == ["d2", "e", "g", "g2", "h", "f", "h2", "sub", "old", "new"]
    assert "backend fuse" in r.stderr and "not kernel-userns:" in r.stderr
    assert "redirects of renamed directories" in r.stderr
    # asked for by name, kernel-userns refuses with the reason instead of a wrong tree
    r = ly.ovf("run", "--backend", "kernel-userns", "-o", ly.opts, "--", "true", check=False)
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "would show another tree" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_fuse_takes_over_a_work_dir_the_kernel_used(unprivileged: Unprivileged) -> None:
    """The kernel leaves work/work at mode 000; a FUSE mount by the same user opens it up."""
    ly = UserLayers(unprivileged, unprivileged.home / "kw")
    used, wrote = ly.run([["append", "g", "new\n"], ["mkdir", "n"]], backend="kernel-userns")
    assert used == "kernel-userns"
    assert (ly.work / "work").stat().st_mode & 0o777 == 0
    used, read = ly.run([["append", "e/y", "more\n"]], backend="fuse")
    assert read["outcomes"] == ["ok"]
    assert read["tree"]["g"][3] == wrote["tree"]["g"][3] and "n" in read["tree"]
    # and back to the kernel, which recreates its work dir as it likes
    used, again = ly.run([], backend="kernel-userns")
    assert diff_trees(read["tree"], again["tree"]) == []


def test_another_users_work_dir_is_replaced_when_empty(unprivileged: Unprivileged) -> None:
    """Root's kernel mount of a user's layers leaves work/work root's, mode 000, empty: the
    user's FUSE mount replaces it (the kernel recreates it at each mount anyway)."""
    ly = UserLayers(unprivileged, unprivileged.home / "rw")
    (ly.work / "work").mkdir(mode=0)
    os.chown(ly.work / "work", 0, 0)
    used, read = ly.run([["append", "e/y", "z\n"]], backend="fuse")
    assert read["outcomes"] == ["ok"]
    assert (ly.work / "work").stat().st_uid == unprivileged.uid


def test_another_users_busy_work_dir_is_a_one_line_error(unprivileged: Unprivileged) -> None:
    ly = UserLayers(unprivileged, unprivileged.home / "ow")
    (ly.work / "work").mkdir()
    (ly.work / "work/left").write_text("")
    os.chmod(ly.work / "work", 0)
    os.chown(ly.work / "work", 0, 0)
    r = ly.ovf("run", "--backend", "fuse", "-o", ly.opts, "--", "true", check=False)
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "belongs to uid 0" in r.stderr and "Error" not in r.stderr


def test_record_is_on_disk_when_the_daemon_is_killed(unprivileged: Unprivileged) -> None:
    """Announced before the marker it names: a SIGKILL right after a dir rename leaves both."""
    ly = UserLayers(unprivileged, unprivileged.home / "kill")
    r = ly.ovf("mount", "-v", "-o", ly.opts, str(ly.mnt))
    pid = int(re.search(r"daemon pid (\d+)", r.stderr).group(1))
    try:
        mv = unprivileged.run_as_user(["mv", str(ly.mnt / "d1"), str(ly.mnt / "d2")],
                                      capture_output=True, text=True)
        assert mv.returncode == 0, mv.stderr
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)
    finally:
        ly.ovf("umount", str(ly.mnt), check=False)
        subprocess.run(["umount", "-l", str(ly.mnt)], capture_output=True)
    assert "redirect" in _record(ly.upper)
    used, read = ly.run([])
    assert used == "fuse" and "d2/sub/x" in read["tree"]


# -- as root ------------------------------------------------------------------------------------

def test_root_reads_a_users_layers_as_the_user_saw_them(unprivileged: Unprivileged,
                                                        tmp_path: Path) -> None:
    """``user.overlay.*`` markers as root: the kernel with userxattr where it can read them,
    FUSE (with userxattr) where the layers hold a redirect."""
    from overlayfuse.spec import OverlaySpec
    from overlayfuse.survey import adapt, survey

    ly = UserLayers(unprivileged, unprivileged.home / "root1")
    # an opaque dir (rmdir + mkdir of a lower dir) and a copy-up: a root kernel mount without
    # userxattr would show e/y again
    _, wrote = ly.run([["unlink", "e/y"], ["rmdir", "e"], ["mkdir", "e"], ["append", "d1/f", "x\n"]],
                      backend="fuse")
    spec = OverlaySpec.from_options(ly.opts)
    assert survey(spec).namespace == "user"
    assert adapt(spec, "kernel").userxattr
    assert _root_auto_tree(spec, tmp_path / "a") == ("kernel", wrote["tree"])
    # now a renamed lower dir: only FUSE can read it
    _, wrote = ly.run([["rename", "d1", "d2"]], backend="fuse")
    assert _root_auto_tree(spec, tmp_path / "b") == ("fuse", wrote["tree"])


def test_root_kernel_reads_what_fuse_wrote_with_an_index(tmp_path: Path) -> None:
    """FUSE as root keeps hard links through the index; auto's kernel mount gets index=on (the
    kernel's default is off here) and shows both names with the new data."""
    from overlayfuse.spec import OverlaySpec

    lower = _lower(tmp_path)
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (upper, work, mnt):
        d.mkdir()
    with overlayfuse_mount([lower], upper, work, mnt):
        with open(mnt / "g", "a") as f:
            f.write("new\n")
        os.rename(mnt / "d1", mnt / "d2")
        fuse_tree = tree_snapshot(mnt)
    assert os.getxattr(upper, "trusted.overlay.ovf.features") == b"index,redirect"
    spec = OverlaySpec(lowerdirs=(str(lower),), upperdir=str(upper), workdir=str(work))
    backend, tree = _root_auto_tree(spec, tmp_path / "k")
    assert backend == "kernel"
    assert tree["g2"] == tree["g"] and tree["g2"][3] == _digest("old\nnew\n")
    with kernel_overlay([lower], upper, work, mnt, opts="index=on"):
        assert diff_trees(fuse_tree, tree_snapshot(mnt)) == []


def _digest(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _root_auto_tree(spec: Any, where: Path) -> tuple[str, dict[str, Any]]:
    """Mount ``spec`` as root with auto: (the backend chosen, the tree user_ops.py sees)."""
    import overlayfuse
    from overlayfuse.backends.choose import choose

    backend, _why = choose(spec, "mount")
    where.mkdir()
    ops = where.parent / f"{where.name}.json"
    ops.write_text("[]")
    with overlayfuse.mount(spec, str(where)):
        r = subprocess.run(["/usr/bin/python3", str(HERE / "user_ops.py"), str(ops)], cwd=where,
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return backend.name, json.loads(r.stdout)["tree"]
