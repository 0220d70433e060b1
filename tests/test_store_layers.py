"""mock's overlayfs_layers_test, step by step, with real mounts in between.

After each step: how many layer dirs exist, which references share a layer, and how many
holders each layer has (mock's refcount: references plus child layers).  Our init also takes
the snapshot ``postinit`` (as mock does), so the base layer has one holder more than mock's.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayfuse import LayerStore
from overlayfuse.store import catalog as cat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root here")


class Scenario:
    def __init__(self, base: Path, mnt: Path, backend: str) -> None:
        self.store = LayerStore(str(base))
        self.config = self.store.config("cfg")
        self.mnt = mnt
        self.backend = backend
        self.log: list[str] = []

    def layer(self, ref: str) -> str:
        layer = self.config.refs()[ref]
        assert layer
        return layer

    def n_layers(self) -> int:
        return len(os.listdir(self.store.layout.sub("layers")))

    def holders(self, ref: str) -> int:
        return len(cat.holders(self.store.db(), self.layer(ref)))

    def mount_and_write(self, name: str) -> None:
        """mock's prepareLayersForMount, done for real: mount, write a file, unmount."""
        with self.config.mount(str(self.mnt), self.backend):
            (self.mnt / name).write_text(name)

    def state(self, step: str) -> None:
        refs = self.config.refs()
        by_layer: dict[str, list[str]] = {}
        for name, layer in sorted(refs.items()):
            by_layer.setdefault(layer, []).append(name)
        groups = " | ".join(f"{'='.join(names)} ({self.holders(names[0])})"
                            for names in by_layer.values())
        self.log.append(f"{step:28} layers={self.n_layers()}  {groups}")

    def same(self, a: str, b: str) -> bool:
        return self.layer(a) == self.layer(b)

    def expect(self, step: str, n_layers: int, same: list[tuple[str, str]] = [],
               differ: list[tuple[str, str]] = [], holders: dict[str, int] = {}) -> None:
        """Log the state after ``step``, then check it as mock's test does."""
        self.state(step)
        assert self.n_layers() == n_layers, step
        for a, b in same:
            assert self.same(a, b), f"{step}: {a} and {b} should share a layer"
        for a, b in differ:
            assert not self.same(a, b), f"{step}: {a} and {b} should not share a layer"
        for ref, n in holders.items():
            assert self.holders(ref) == n, f"{step}: {ref} has {self.holders(ref)} holders"


@pytest.fixture(params=["kernel", "fuse"])
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Scenario:
    (tmp_path / "mnt").mkdir()
    return Scenario(tmp_path / "store", tmp_path / "mnt", request.param)


def test_mock_layer_scenario(scenario: Scenario) -> None:
    s, c = scenario, scenario.config
    base, upper, current = ".base", ".upper", ".current"
    c.init()
    s.expect("init", 1, same=[(base, upper), (base, current), (base, "postinit")],
             holders={base: 4})                      # .base .upper .current postinit
    s.mount_and_write("one")
    s.expect("mount", 2, same=[(base, current)], differ=[(base, upper)],
             holders={base: 4, upper: 1})            # .base .current postinit + child
    c.snapshot("a")
    s.expect("snapshot a", 2, same=[("a", upper), ("a", current)], holders={base: 3, "a": 3})
    s.mount_and_write("two")
    s.expect("mount", 3, same=[("a", current)], differ=[("a", upper)],
             holders={"a": 3, upper: 1})
    c.rollback("a")
    s.expect("rollback a", 2, same=[("a", upper), ("a", current)], holders={base: 3, "a": 3})
    s.mount_and_write("three")
    s.expect("mount", 3, same=[("a", current)], differ=[("a", upper)],
             holders={"a": 3, upper: 1})
    c.snapshot("b")
    s.expect("snapshot b", 3, same=[("b", upper), ("b", current)], holders={"a": 2, "b": 3})
    s.mount_and_write("four")
    s.mount_and_write("five")                        # the second mount reuses the upper
    s.expect("two mounts", 4, same=[("b", current)], differ=[("a", upper), ("b", upper)],
             holders={"b": 3})
    c.rollback("postinit")
    s.expect("rollback postinit", 3, same=[(base, upper), (base, current)],
             holders={base: 5, "a": 2, "b": 1})
    with c.mount(str(s.mnt), s.backend):
        assert sorted(os.listdir(s.mnt)) == []       # the base layer: empty again
    s.expect("mount (postinit)", 4)
    c.clean()
    s.expect("clean", 3)
    c.rollback("b")
    with c.mount(str(s.mnt), s.backend):
        assert sorted(os.listdir(s.mnt)) == ["one", "three"]
    c.rollback("postinit")
    c.remove_snapshot("a")
    s.expect("remove-snapshot a", 3, holders={base: 5, "b": 1})
    assert "a" not in c.refs()
    c.remove_snapshot("b")
    s.expect("remove-snapshot b", 1, same=[(base, upper)], holders={base: 4})
    assert "b" not in c.refs()
    print("\n" + "\n".join(s.log))


def test_removing_snapshots_the_other_way_round(scenario: Scenario) -> None:
    s, c = scenario, scenario.config
    c.init()
    s.mount_and_write("one")
    c.snapshot("a")
    s.mount_and_write("two")
    c.snapshot("b")
    c.rollback("postinit")
    assert s.n_layers() == 3
    c.remove_snapshot("b")                           # the child first: a's layer stays
    assert s.n_layers() == 2 and s.holders("a") == 1
    c.remove_snapshot("a")
    assert s.n_layers() == 1 and s.holders(".base") == 4
    c.remove_snapshot("postinit")                    # even postinit; the config still works
    with c.mount(str(s.mnt), s.backend):
        (s.mnt / "x").write_text("x")
    c.snapshot("again")
    assert [(x.name, x.current) for x in c.snapshots()] == [("again", True)]
    assert s.store.gc()["missing"] == 0
