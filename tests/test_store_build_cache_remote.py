"""A build cache shared through a registry: ``build --cache-to`` on one store, ``--cache-from``
on another (two base dirs, as two machines) takes every step from it instead of running it,
and ends with the same keys and the same tree; a changed step runs, the ones before it come
from the cache.  An OCI layout works as the cache too; an unreachable registry to take from
is a warning and the build goes on."""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import pytest

from helpers import ovf
from oci_helpers import chain_dirs, chain_view, registry, view
from test_store_root import HOST_TOOLS

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="these tests run as root"),
              pytest.mark.usefixtures("private_probe_cache")]

STEP = re.compile(r"\[(\d+)/\d+\] (cached|ran|pulled) +([0-9a-f]{12}) ")
STEPS = ("mkdir -p /opt && echo one > /opt/one && mkdir /opt/gone\n"
         "COPY data /opt/data\n"
         "ENV GREETING=hello\n"
         "rm -r /opt/gone && echo \"$GREETING\" > /opt/greeting && ln /opt/one /opt/link\n")


def project(root: Path) -> tuple[Path, Path]:
    """A base tarball and a step file with its COPY input, the same on every 'machine'."""
    tree = root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os").write_text("base\n")
    tarball = root / "base.tar"
    with tarfile.open(tarball, "w") as t:
        t.add(tree, ".")
    ctx = root / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "data" / "f").write_text("data\n")
    (ctx / "steps").write_text(STEPS)
    return tarball, ctx / "steps"


def build(base: Path, tarball: Path, steps: Path, *args: str
          ) -> tuple[list[tuple[int, str, str]], str]:
    r = ovf("build", "--base", str(base), "--config", "app", "--from-tar", str(tarball),
            *HOST_TOOLS, *args, str(steps))
    assert r.returncode == 0, r.stderr
    return ([(int(n), how, k) for n, how, k in STEP.findall(r.stderr)],
            r.stderr.split("; key ")[1][:64])


def tree_of(base: Path, tmp: Path) -> dict[str, object]:
    with chain_view(chain_dirs(base, "app", ".current"), tmp) as v:
        return view(v)


def test_a_second_store_takes_every_step_from_the_registry(tmp_path: Path) -> None:
    tarball, steps = project(tmp_path)
    (tmp_path / "reg").mkdir()
    with registry(tmp_path / "reg") as reg:
        cache = ["--cache-to", f"docker://{reg}/ovf/cache", "--tls-verify=false"]
        a_steps, a_key = build(tmp_path / "a", tarball, steps, *cache)
        assert [how for _, how, _ in a_steps] == ["ran"] * 3
        take = ["--cache-from", f"docker://{reg}/ovf/cache", "--tls-verify=false"]
        b_steps, b_key = build(tmp_path / "b", tarball, steps, *take)
        assert [how for _, how, _ in b_steps] == ["pulled"] * 3
        assert [k for *_, k in b_steps] == [k for *_, k in a_steps] and b_key == a_key
        assert tree_of(tmp_path / "b", tmp_path / "vb") == tree_of(tmp_path / "a",
                                                                   tmp_path / "va")
        # a changed last step: the ones before it from the cache, it runs here
        steps.write_text(STEPS.replace("GREETING=hello", "GREETING=bye"))
        c_steps, _ = build(tmp_path / "c", tarball, steps, *take)
        assert [how for _, how, _ in c_steps] == ["pulled", "pulled", "ran"]
        # the same store again: everything local now
        c_steps, _ = build(tmp_path / "c", tarball, steps, *take)
        assert [how for _, how, _ in c_steps] == ["cached"] * 3


def test_an_oci_layout_is_a_cache_and_an_unreachable_one_only_warns(tmp_path: Path) -> None:
    tarball, steps = project(tmp_path)
    layout = f"oci:{tmp_path / 'layout'}"
    a_steps, a_key = build(tmp_path / "a", tarball, steps, "--cache-to", layout)
    b_steps, b_key = build(tmp_path / "b", tarball, steps, "--cache-from", layout)
    assert [how for _, how, _ in b_steps] == ["pulled"] * 3 and b_key == a_key
    r = ovf("build", "--base", str(tmp_path / "d"), "--config", "app", "--from-tar",
            str(tarball), *HOST_TOOLS, "--cache-from", "docker://127.0.0.1:9/nothing",
            "--tls-verify=false", str(steps))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--cache-from docker://127.0.0.1:9/nothing" in warnings[0]
    assert [how for _, how, _ in STEP.findall(r.stderr)] == ["ran"] * 3
    r = ovf("build", "--base", str(tmp_path / "e"), "--cache-to",
            "docker://127.0.0.1:9/x:tag", str(steps))
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "overlayfuse: --cache-to docker://127.0.0.1:9/x:tag: name a repository without a "
        "tag (each step is a tag of it)"]
