"""The probe: real trial mounts per backend, facts about the directory, cache, cleanup."""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mounts import REPO, force_unmount, mounts_under, overlayfuse_pids
from overlayfuse import sysmount
from overlayfuse.probe import (BACKENDS, SCRATCH_PREFIX, Report, _cache_key, cache_path,
                               probe)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the probe tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]


def leftovers(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(SCRATCH_PREFIX))


def test_root_on_ext4_every_backend_works(tmp_path: Path) -> None:
    started = time.monotonic()
    rep = probe(str(tmp_path), refresh=True)
    elapsed = time.monotonic() - started
    assert not rep.cached
    assert set(rep.trials) == set(BACKENDS)
    for b in BACKENDS:
        assert rep.trials[b].ok, (b, rep.trials[b].reason)
        assert "whiteout char 0/0" in rep.trials[b].reason
    # kernel-userns never serves a mount visible to other processes
    assert not rep.verdict("kernel-userns", "mount").ok
    assert "only `run`" in rep.verdict("kernel-userns", "mount").reason
    assert rep.verdict("kernel-userns", "run").ok
    assert rep.preferred("mount") == "kernel" and rep.preferred("run") == "kernel"
    f = rep.facts
    assert (f.kernel_release, f.kernel_version) == (os.uname().release, os.uname().version)
    assert f.fs_type == sysmount.mount_fstype(str(tmp_path))
    assert f.mknod_whiteout and f.trusted_xattr and f.user_xattr and f.d_type
    assert f.uid == 0 and f.user == "root"
    # the whole uncached probe, FUSE daemon included, stays well under a second
    assert elapsed < 1.0, f"uncached probe took {elapsed:.3f} s"
    assert leftovers(tmp_path) == []
    assert mounts_under(tmp_path) == []


def test_cache_hit_and_refresh(tmp_path: Path) -> None:
    first = probe(str(tmp_path))
    assert not first.cached
    t = time.monotonic()
    second = probe(str(tmp_path))
    assert second.cached and time.monotonic() - t < 0.05
    assert {b: t.ok for b, t in second.trials.items()} == {b: t.ok for b, t in first.trials.items()}
    assert os.path.exists(cache_path())
    third = probe(str(tmp_path), refresh=True)
    assert not third.cached and third.probed_at > first.probed_at


def test_cached_no_does_not_outlive_a_kernel_change(tmp_path: Path) -> None:
    """A "no" recorded by another kernel is never served, even under the current key."""
    rep = probe(str(tmp_path))
    d = rep.to_dict()
    d["kernel"]["version"] = "#0 an older build"
    for b in d["backends"].values():
        b["trial"]["ok"] = False
        b["trial"]["reason"] = "refused by the old kernel"
    with open(cache_path()) as f:
        data = json.load(f)
    data["entries"][_cache_key(str(tmp_path))] = d
    with open(cache_path(), "w") as f:
        json.dump(data, f)
    again = probe(str(tmp_path))
    assert not again.cached
    assert again.trials["kernel"].ok


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    rep = probe(str(tmp_path))
    back = Report.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back.to_dict()["backends"] == rep.to_dict()["backends"]
    assert back.facts == rep.facts


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_scratch_of_a_killed_probe_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{SCRATCH_PREFIX}{_dead_pid()}-0badcafe"
    (stale / "kernel" / "work" / "work").mkdir(parents=True)
    os.chmod(stale / "kernel" / "work" / "work", 0)
    alive = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}-0badcafe"  # a live PID: kept
    alive.mkdir()
    probe(str(tmp_path), refresh=True)
    assert leftovers(tmp_path) == [alive.name]


# The real probe, held at one trial: that trial's exercise (in the trial's child, its overlay
# mounted) runs, says so on stdout and waits, so the test kills a probe known to be mid-trial.
HELD_PROBE = """
import sys, time
from pathlib import Path
from overlayfuse.probe import probe, trials
real_exercise = trials.exercise

def held_exercise(merged):
    real_exercise(merged)
    if Path(merged).parent.name == sys.argv[2]:
        print("held", merged, flush=True)
        time.sleep(60)

trials.exercise = held_exercise
probe(sys.argv[1], refresh=True)
print("done", flush=True)
"""


def _read_line(p: subprocess.Popen[str], timeout: float) -> str:
    """The next line the process prints, or "" when it ends or says nothing in *timeout*."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return p.stdout.readline() if ready else ""


def _probe_processes_gone(tmp_path: Path, timeout: float = 10.0) -> list[int]:
    """Processes of the killed probe (its trial child, its FUSE daemon) still alive after
    *timeout*: they end by themselves once their probe is gone."""
    deadline = time.monotonic() + timeout
    while overlayfuse_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return overlayfuse_pids(tmp_path)


@pytest.mark.parametrize("trial", ["kernel", "userns", "fuse"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_killed_probe_leaves_nothing(tmp_path: Path, private_probe_cache: Path, trial: str,
                                     sig: signal.Signals) -> None:
    """Killed mid-trial (its scratch dir there, the FUSE trial's mount up): on SIGTERM the
    probe cleans up itself; after SIGKILL its FUSE daemon goes, and the next probe removes
    the scratch dir."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(private_probe_cache))
    p = subprocess.Popen([sys.executable, "-c", HELD_PROBE, str(tmp_path), trial], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        scratch = _kill_mid_trial(p, tmp_path, trial, sig)
        if sig == signal.SIGTERM:
            assert leftovers(tmp_path) == []
            assert mounts_under(tmp_path) == []
            assert _probe_processes_gone(tmp_path) == []
        else:
            assert leftovers(tmp_path) == [scratch.name]  # SIGKILL: no clean-up of its own
            assert _probe_processes_gone(tmp_path) == []
            assert mounts_under(tmp_path) == []  # the FUSE daemon unmounts when its prober dies
            probe(str(tmp_path), refresh=True)
            assert leftovers(tmp_path) == []
            assert mounts_under(tmp_path) == []
    finally:
        _stop_remains(p, tmp_path)


def _kill_mid_trial(p: subprocess.Popen[str], tmp_path: Path, trial: str,
                    sig: signal.Signals) -> Path:
    """Wait until the held probe is inside *trial*, check that state, send *sig*; the probe
    must die of it before finishing.  Returns the probe's scratch dir."""
    line = _read_line(p, 20)
    assert line.startswith("held "), f"the probe never reached its {trial} trial: {line!r}"
    merged = Path(line.split(" ", 1)[1].rstrip("\n"))
    scratch = merged.parents[1]
    # the state the kill lands in: the probe is running, inside its scratch dir's trial
    assert p.poll() is None
    assert scratch.parent == tmp_path and leftovers(tmp_path) == [scratch.name]
    assert merged.is_dir() and merged.parent.name == trial
    # the probe and its trial's child, and the FUSE trial's daemon
    held = overlayfuse_pids(tmp_path)
    assert p.pid in held and len(held) == (3 if trial == "fuse" else 2), held
    if trial == "fuse":
        assert [m.mountpoint for m in mounts_under(tmp_path)] == [str(merged)]
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -sig, (p.returncode, out, err)
    assert "done" not in out
    return scratch


def _stop_remains(p: subprocess.Popen[str], tmp_path: Path) -> None:
    """Whatever a failed test left: the probe, its trial child and daemon, their mounts."""
    if p.poll() is None:
        p.kill()
        p.communicate()
    for pid in overlayfuse_pids(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for m in reversed(mounts_under(tmp_path)):
        force_unmount(m.mountpoint)


def test_probe_facts_on_an_overlay_directory(tmp_path: Path) -> None:
    """A dir inside a kernel overlay: the kernel refuses it as upper and says so."""
    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    m = str(tmp_path / "m")
    sysmount.mount_overlay([str(tmp_path / "l")], str(tmp_path / "u"), str(tmp_path / "w"), m)
    try:
        rep = probe(m, refresh=True)
        assert rep.facts.fs_type == "overlay"
        assert not rep.facts.mknod_whiteout  # overlayfs refuses mknod c 0 0 on itself
        for b in ("kernel", "kernel-userns"):
            assert not rep.trials[b].ok
            assert "not supported as upperdir" in rep.trials[b].reason
        assert leftovers(Path(m)) == []
    finally:
        sysmount.umount2(m)
