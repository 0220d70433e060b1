"""How big each workload is: the full sizes of issue 4 and the tiny ``--quick`` ones.

One frozen dataclass, so a fixture's cache key can be derived from the numbers that shape it
and a quick run can never reuse (or clobber) the layers of a full one.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """Every number that shapes a fixture or a workload."""

    # stat tree over 2 lowers: top dirs x subdirs x files per subdir per lower
    tree_top: int
    tree_sub: int
    tree_files: int
    tree_delete_top: int     # top dirs removed by the delete workload (~10,000 entries in full)
    list_per_lower: int      # entries per lower in the one merged big directory
    seq_read_bytes: int
    small_dirs: int          # small-file fixture: dirs (in both lowers) x files per dir per lower
    small_files: int
    small_size: int
    small_read_count: int    # files read by the small-read workload
    copyup_small_count: int
    rename_count: int
    write_bytes: int
    create_count: int
    copyup_big_bytes: int
    tar_subdirs: tuple[str, ...]   # () = all of /usr/lib/python3.11
    lookup_layers: tuple[int, ...]
    lookup_count: int        # lookups per pass in the layer-scaling series
    rss_walks: tuple[int, ...]     # entries in the RSS-walk trees (files, over 2 lowers)
    small_writes: int = 0    # 4-byte O_APPEND writes to one new file (xfstests generic/069)
    mixed_procs: int = 8     # processes of the mixed concurrent load
    mixed_ops: int = 0       # operations per process of the mixed load

    @property
    def tree_entries(self) -> int:
        """Merged entries of the stat tree (top dirs + subdirs + files)."""
        return self.tree_top * (1 + self.tree_sub * (1 + 2 * self.tree_files))


FULL = Sizes(
    tree_top=50, tree_sub=10, tree_files=50, tree_delete_top=10,
    list_per_lower=10_000,
    seq_read_bytes=1024 * MiB,
    small_dirs=50, small_files=50, small_size=4096, small_read_count=5000,
    copyup_small_count=1000, rename_count=1000,
    write_bytes=1024 * MiB,
    create_count=10_000,
    copyup_big_bytes=512 * MiB,
    tar_subdirs=(),
    lookup_layers=(1, 10, 100, 500),
    lookup_count=1000,
    rss_walks=(100_000, 1_000_000),
    small_writes=20_000,
    mixed_ops=500,
)

QUICK = Sizes(
    tree_top=4, tree_sub=3, tree_files=10, tree_delete_top=1,
    list_per_lower=200,
    seq_read_bytes=4 * MiB,
    small_dirs=4, small_files=25, small_size=1024, small_read_count=200,
    copyup_small_count=20, rename_count=20,
    write_bytes=4 * MiB,
    create_count=100,
    copyup_big_bytes=2 * MiB,
    tar_subdirs=("json", "email"),
    lookup_layers=(1, 5),
    lookup_count=20,
    rss_walks=(2_000,),
    small_writes=500,
    mixed_ops=40,
)
