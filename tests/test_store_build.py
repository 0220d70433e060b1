"""``overlayfuse build``: each step cached as a layer; reruns start at the first changed or
failed step; ``--no-cache``; a build on another config's snapshot; ``--tag``."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import ovf
from overlayfuse import LayerStore
from overlayfuse.store.stepfile import parse_steps
from test_store_root import HOST_TOOLS, SEEN_MOUNT_POINTS

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]


def write_steps(path: Path, log: Path, steps: list[str]) -> Path:
    """Each step also appends its number to ``log`` (outside the tree, bound in at /ran by
    ``build``): what really ran."""
    path.write_text("".join(f"echo {i} >> /ran/{log.name}; {s}\n"
                            for i, s in enumerate(steps, 1)))
    return path


def ran(log: Path) -> list[int]:
    out = [int(x) for x in log.read_text().split()] if log.exists() else []
    log.unlink(missing_ok=True)
    return out


def build(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The steps see the tree as /: the host's programs and the log's dir bound in."""
    return ovf("build", "--base", str(base), *HOST_TOOLS, "--bind", f"{base.parent}:/ran",
               *args)


def store_run(base: Path, config: str, *cmd: str) -> str:
    r = ovf("store", "--base", str(base), "--config", config, "run", *HOST_TOOLS, "--", *cmd)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_parse_steps() -> None:
    text = "# comment\n\n  echo a  \nmake \\\n  all \\\n  install\n   # indented comment\nls\n"
    assert parse_steps(text) == ["echo a", "make all install", "ls"]


def test_cache_hits_changes_failures_and_no_cache(tmp_path: Path) -> None:
    base, log = tmp_path / "store", tmp_path / "log"
    steps = ["echo one > one", "mkdir d && echo two > d/two", "cat one d/two > both"]
    f = write_steps(tmp_path / "steps", log, steps)
    r = build(base, "--config", "app", "--tag", "v1", str(f))
    assert r.returncode == 0, r.stderr
    assert ran(log) == [1, 2, 3]
    assert "[3/3] ran " in r.stderr
    assert "built app: 3 steps, 3 ran, 0 cached; key " in r.stderr and "; tagged v1" in r.stderr
    n_layers = len(os.listdir(base / "layers"))   # base + 3 steps
    assert n_layers == 4
    assert store_run(base, "app", "cat", "both") == "one\ntwo\n"  # allocates an upper

    r = build(base, "--config", "app", str(f))
    assert r.returncode == 0 and ran(log) == []
    assert r.stderr.count("] cached ") == 3
    assert len(os.listdir(base / "layers")) == n_layers

    steps[1] = "mkdir d && echo TWO > d/two"        # a changed step: it and what follows
    write_steps(f, log, steps)
    r = build(base, "--config", "app", str(f))
    assert r.returncode == 0 and ran(log) == [2, 3]
    assert "[1/3] cached" in r.stderr
    assert store_run(base, "app", "cat", "both") == "one\nTWO\n"

    write_steps(f, log, steps + ["echo broken > four; exit 7", "touch five"])
    r = build(base, "--config", "app", str(f))
    assert r.returncode == 7 and ran(log) == [4]
    assert "[4/5] failed with exit status 7" in r.stderr
    assert store_run(base, "app", "cat", "both") == "one\nTWO\n"   # the current state stays
    write_steps(f, log, steps + ["echo fixed > four", "touch five"])
    r = build(base, "--config", "app", str(f))
    assert r.returncode == 0 and ran(log) == [4, 5]                # resumes at the failed one
    assert store_run(base, "app", "ls").split() == sorted(
        ["both", "d", "five", "four", "one", *SEEN_MOUNT_POINTS])

    r = build(base, "--config", "app", "--no-cache", str(f))
    assert r.returncode == 0 and ran(log) == [1, 2, 3, 4, 5]
    # v1 still names the first build, and mounts as a snapshot
    assert ovf("store", "--base", str(base), "--config", "app", "run", "--snapshot", "v1",
               *HOST_TOOLS, "--", "cat", "both").stdout == "one\ntwo\n"
    snaps = ovf("store", "--base", str(base), "--config", "app", "snapshots").stdout
    assert snaps == "  postinit\n  v1\n"
    assert LayerStore(str(base)).gc()["missing"] == 0


def test_build_on_another_configs_snapshot_shares_its_layers(tmp_path: Path) -> None:
    base, log = tmp_path / "store", tmp_path / "log"
    src = tmp_path / "src"
    src.mkdir()
    (src / "from-dir").write_text("d")
    f1 = write_steps(tmp_path / "base-steps", log, ["echo os > os-release"])
    r = build(base, "--config", "os", "--from", str(src), "--tag", "ready", str(f1))
    assert r.returncode == 0, r.stderr
    f2 = write_steps(tmp_path / "app-steps", log, ["cat os-release > app"])
    r = build(base, "--config", "app", "--from-config", "os:ready", "--tag", "v1", str(f2))
    assert r.returncode == 0, r.stderr
    assert store_run(base, "app", "ls").split() == sorted(
        ["app", "from-dir", "os-release", *SEEN_MOUNT_POINTS])
    store = LayerStore(str(base))
    os_ready = store.config("os").refs()["ready"]
    assert store.config("app").refs()[".base"] == os_ready       # shared, not copied
    # the same build again, the same way: cached; another origin is refused
    r = build(base, "--config", "app", "--from-config", "os:ready", str(f2))
    assert r.returncode == 0 and "1 cached" in r.stderr
    r = build(base, "--config", "app", "--from", str(src), str(f2))
    assert r.returncode == 1 and "was made from config os:ready" in r.stderr
    # scrubbing os leaves what app stands on
    assert ovf("store", "--base", str(base), "--config", "os", "scrub").returncode == 0
    assert store_run(base, "app", "cat", "app") == "os\n"
    assert ran(log) == [1, 1]
