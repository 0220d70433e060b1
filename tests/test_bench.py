"""The benchmark harness keeps working: `python -m bench --quick` end to end, no timing checks.

The quick run mounts every available system for real (kernel overlayfs as root, overlayfuse,
fuse-overlayfs, the raw floor) on tiny layers; the test checks that every workload produced a
measurement on every system, that the chart is a PNG and that no mount is left behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import report, systems  # noqa: E402
from bench.sizes import QUICK  # noqa: E402
from bench.workloads import all_workloads  # noqa: E402


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                 Path, Path]:
    base = tmp_path_factory.mktemp("bench")
    out, cache = base / "out", base / "cache"
    r = _bench("--quick", "--out", str(out), "--cache", str(cache))
    return r, out, cache


def test_quick_run_covers_every_workload_and_system(quick_run) -> None:
    r, out, cache = quick_run
    assert r.returncode == 0, f"bench --quick failed ({r.returncode}):\n{r.stderr[-4000:]}"
    data = json.loads((out / "results.json").read_text())
    meta, summary = data["meta"], data["summary"]

    ran = set(meta["systems"])
    assert "raw" in ran
    if os.geteuid() == 0:
        assert "kernel" in ran, meta["skipped_systems"]
    for name, why in meta["skipped_systems"].items():
        assert why, f"{name} skipped without a reason"
    defaults = {n for n, s in systems.ALL.items() if s.default}  # the others run on request
    assert ran | set(meta["skipped_systems"]) == defaults

    expected = {f"{w.name}/{m}" for w in all_workloads(QUICK) for m in w.modes}
    assert set(summary) == expected
    for key, entry in summary.items():
        for s in ran:
            st = entry["systems"][s]
            assert not st["errors"], f"{key} on {s}: {st['errors']}"
            assert len(st["times"]) == meta["reps"] and all(t > 0 for t in st["times"]), (key, s)
            assert st["min"] <= st["median"] <= st["max"]
            if systems.ALL[s].is_fuse:
                assert st["cpu_median"] is not None and st["rss_peak_kb"] > 0, (key, s)
        if "kernel" in ran:
            assert entry["ratios"]["kernel"]["kernel"] == pytest.approx(1.0)
    # runs alternate between systems: A B C A B C ...
    order = [(rec["system"]) for rec in data["records"]
             if rec["workload"] == "stat-tree" and rec["mode"] == "cold"]
    assert order == sorted(ran, key=order.index) * meta["reps"]


def test_quick_run_writes_table_and_chart(quick_run) -> None:
    r, out, cache = quick_run
    assert r.returncode == 0, r.stderr[-4000:]
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| stat-tree | cold |" in table and table in r.stdout
    if "kernel" in json.loads((out / "results.json").read_text())["meta"]["systems"]:
        assert "×kernel" in table


def test_quick_run_leaves_no_mount_and_no_run_dirs(quick_run) -> None:
    r, out, cache = quick_run
    assert systems.mounts_under(cache) == []
    assert list((cache / "runs").iterdir()) == []
    assert [m for m, t in systems.mountpoints() if t in ("overlay", "fuse.overlayfuse",
                                                          "fuse.fuse-overlayfs")
            and str(cache) in m] == []


def test_bad_arguments_give_one_line_errors(tmp_path: Path) -> None:
    for args, needle in ((["--systems", "nope"], "unknown system 'nope'"),
                         (["--workloads", "no-such-*"], "no workload matches"),
                         (["--reps", "0"], "--reps must be at least 1")):
        r = _bench("--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "c"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("bench: ") and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_report_ratios_and_medians() -> None:
    meta = {"systems": ["raw", "kernel", "fuse-overlayfs"], "date": "d", "kernel": "k",
            "cpus": 2, "quick": True, "reps": 3,
            "workloads": {"w": {"what": "w", "modes": ["cold"], "group": "main", "ops": 0,
                                "reps": 3}}}
    times = {"kernel": [1.0, 3.0, 2.0], "fuse-overlayfs": [4.0, 4.5, 9.0], "raw": [0.5, 0.5, 1.0]}
    recs = [{"workload": "w", "mode": "cold", "system": s, "rep": i, "seconds": t, "cpu": None,
             "rss_kb": None, "error": None} for s, ts in times.items() for i, t in enumerate(ts)]
    recs.append({"workload": "w", "mode": "cold", "system": "raw", "rep": 3, "seconds": None,
                 "cpu": None, "rss_kb": None, "error": "boom"})
    e = report.build(meta, recs)["summary"]["w/cold"]
    assert e["systems"]["kernel"]["median"] == 2.0
    assert (e["systems"]["fuse-overlayfs"]["min"], e["systems"]["fuse-overlayfs"]["max"]) == \
        (4.0, 9.0)
    assert e["ratios"]["fuse-overlayfs"]["kernel"] == pytest.approx(2.25)
    assert e["ratios"]["raw"]["kernel"] == pytest.approx(0.25)
    assert e["ratios"]["kernel"]["fuse-overlayfs"] == pytest.approx(2.0 / 4.5)
    assert e["systems"]["raw"]["errors"] == ["boom"]
    table = report.table_markdown({"meta": meta, "summary": {"w/cold": e}})
    assert "| w | cold | 2.00 s (1.00 s–3.00 s) | 4.50 s (4.00 s–9.00 s) |" in table
    assert "(1 failed)" in table
