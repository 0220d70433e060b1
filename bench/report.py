"""Turn run records into the summary (median, min, max, ratios), a Markdown table and a chart.

Ratios compare medians: a system's median time over the kernel's and over fuse-overlayfs's for
the same workload and mode; below 1.0 is faster than the reference.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

SYSTEM_ORDER = ("kernel", "fuse-overlayfs", "overlayfuse", "overlayfuse-classic",
                "overlayfuse-zero", "overlayfuse-writeback", "overlayfuse-nospin",
                "overlayfuse-auto", "overlayfuse-b", "raw")
REFS = ("kernel", "fuse-overlayfs")
SHORT = {"kernel": "kernel", "fuse-overlayfs": "f-o", "overlayfuse": "ofs",
         "overlayfuse-classic": "ofs-c", "overlayfuse-zero": "ofs-z",
         "overlayfuse-writeback": "ofs-wb", "overlayfuse-nospin": "ofs-ns",
         "overlayfuse-auto": "ofs-a",
         "overlayfuse-b": "ofs-b", "raw": "raw"}


def _order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (SYSTEM_ORDER.index(n) if n in SYSTEM_ORDER else 99, n))


def build(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: meta, the raw records and per-(workload, mode) statistics."""
    systems = _order(meta["systems"])
    summary: dict[str, Any] = {}
    for wname, winfo in meta["workloads"].items():
        for mode in winfo["modes"]:
            key = f"{wname}/{mode}"
            per: dict[str, Any] = {}
            for s in systems:
                rs = [r for r in records if r["workload"] == wname and r["mode"] == mode
                      and r["system"] == s]
                times = [r["seconds"] for r in rs if r["error"] is None]
                cpus = [r["cpu"] for r in rs if r["error"] is None and r["cpu"] is not None]
                rss = [r["rss_kb"] for r in rs if r["error"] is None and r["rss_kb"] is not None]
                per[s] = {
                    "runs": len(rs), "times": times,
                    "median": statistics.median(times) if times else None,
                    "min": min(times) if times else None,
                    "max": max(times) if times else None,
                    "cpu_median": statistics.median(cpus) if cpus else None,
                    "rss_peak_kb": max(rss) if rss else None,
                    "errors": [r["error"] for r in rs if r["error"] is not None],
                }
            ratios: dict[str, dict[str, float | None]] = {}
            for s in systems:
                ratios[s] = {}
                for ref in REFS:
                    a, b = per[s]["median"], per.get(ref, {}).get("median")
                    ratios[s][ref] = a / b if a is not None and b else None
            summary[key] = {"workload": wname, "mode": mode, "what": winfo["what"],
                            "group": winfo["group"], "ops": winfo["ops"], "systems": per,
                            "ratios": ratios}
    return {"meta": meta, "summary": summary, "records": records}


def _t(v: float | None) -> str:
    if v is None:
        return "–"
    if v < 1:
        return f"{v * 1000:.1f} ms" if v >= 0.01 else f"{v * 1000:.2f} ms"
    return f"{v:.2f} s"


def _cell(st: dict[str, Any]) -> str:
    if st["median"] is None:
        return "FAILED" if st["errors"] else "–"
    rng = "" if st["min"] == st["max"] else f" ({_t(st['min'])}–{_t(st['max'])})"
    bad = f" ({len(st['errors'])} failed)" if st["errors"] else ""
    return f"{_t(st['median'])}{rng}{bad}"


def _r(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def ratio_columns(systems: list[str]) -> list[tuple[str, str]]:
    """(system, reference) pairs shown as ratio columns."""
    cols = []
    for ref in REFS:
        if ref not in systems:
            continue
        for s in systems:
            if s != ref and not (ref == "fuse-overlayfs" and s in ("kernel", "raw")):
                cols.append((s, ref))
    return cols


def table_markdown(result: dict[str, Any]) -> str:
    """Markdown tables: times and ratios, daemon cost, lookup scaling, RSS."""
    meta, summary = result["meta"], result["summary"]
    systems = _order(meta["systems"])
    cols = ratio_columns(systems)
    lines = [f"Benchmark {meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs"
             f"{', QUICK sizes' if meta['quick'] else ''}; median of {meta['reps']} runs "
             f"(fewer where noted) with (min–max); ratios are medians over the reference's "
             f"median, < 1 is faster."
             + (f" As user {meta['as_user']}: the FUSE systems mounted by it through "
                f"fusermount3, every workload run by it, the kernel overlay root's."
                if meta.get("as_user") else "")
             + (" INTERRUPTED: partial results." if meta.get("interrupted") else ""), ""]
    head = ["workload", "mode", *systems, *[f"{SHORT[s]} ×{SHORT[r]}" for s, r in cols]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, e in summary.items():
        reps = meta["workloads"][e["workload"]]["reps"]
        name = e["workload"] + (f" ({reps} runs)" if reps != meta["reps"] else "")
        row = [name, e["mode"], *[_cell(e["systems"][s]) for s in systems],
               *[_r(e["ratios"][s][r]) for s, r in cols]]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Workloads:"]
    for name, w in meta["workloads"].items():
        lines.append(f"- `{name}`: {w['what']}")

    fuse = [s for s in systems if s.startswith("overlayfuse") or s == "fuse-overlayfs"]
    if fuse:
        lines += ["", "Daemon cost per run: CPU seconds (median) / peak RSS (VmHWM, max).", ""]
        head = ["workload", "mode", *[f"{s} CPU" for s in fuse], *[f"{s} RSS" for s in fuse]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, e in summary.items():
            st = e["systems"]
            row = [e["workload"], e["mode"],
                   *[("–" if st[s]["cpu_median"] is None else f"{st[s]['cpu_median']:.2f} s")
                     for s in fuse],
                   *[("–" if st[s]["rss_peak_kb"] is None else
                      f"{st[s]['rss_peak_kb'] / 1024:.0f} MB") for s in fuse]]
            lines.append("| " + " | ".join(row) + " |")

    look = [e for e in summary.values() if e["group"] == "lookup"]
    if look:
        lines += ["", "Lookup latency by number of lower layers (µs per lstat, median).", ""]
        head = ["layers", "mode", *systems]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in look:
            n = meta["workloads"][e["workload"]].get("layers", e["workload"])
            row = [str(n), e["mode"]]
            for s in systems:
                m = e["systems"][s]["median"]
                row.append("–" if m is None or not e["ops"] else f"{m / e['ops'] * 1e6:.1f}")
            lines.append("| " + " | ".join(row) + " |")
    walks = [e for e in summary.values() if e["group"] == "rss"]
    if walks and fuse:
        lines += ["", "Daemon peak RSS while walking a huge tree (VmHWM, max over runs).", ""]
        head = ["entries", *[f"{s} RSS" for s in fuse], *[f"{s} time" for s in systems]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in walks:
            st = e["systems"]
            n = meta["workloads"][e["workload"]].get("entries", e["workload"])
            row = [f"{n:,}" if isinstance(n, int) else str(n),
                   *[("–" if st[s]["rss_peak_kb"] is None else
                      f"{st[s]['rss_peak_kb'] / 1024:.0f} MB") for s in fuse],
                   *[_t(st[s]["median"]) for s in systems]]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """PNG: each system's median over the kernel's and over fuse-overlayfs's, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    meta, summary = result["meta"], result["summary"]
    systems = _order(meta["systems"])
    keys = list(summary)
    refs = [r for r in REFS if r in systems]
    panels: list[tuple[str, list[str], Any]] = []
    for ref in refs:
        shown = [s for s in systems if s != ref and not (ref == "fuse-overlayfs"
                                                          and s in ("kernel", "raw"))]
        if shown:
            panels.append((f"median time ÷ {ref}\n(log scale; < 1× is faster)", shown,
                           lambda k, s, ref=ref: summary[k]["ratios"][s][ref]))
    if not panels:  # no reference ran: plot the plain medians
        panels.append(("median time, seconds (log scale)", systems,
                       lambda k, s: summary[k]["systems"][s]["median"]))
    colors = {"kernel": "#4c72b0", "fuse-overlayfs": "#dd8452", "overlayfuse": "#c44e52",
              "overlayfuse-classic": "#8172b3", "overlayfuse-zero": "#937860",
              "overlayfuse-writeback": "#da8bc3", "overlayfuse-b": "#8c8c8c", "raw": "#55a868"}
    height = max(4.0, 0.32 * len(keys) * max(1, max(len(p[1]) for p in panels)) / 2 + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), height), squeeze=False)
    for ax, (title, shown, get) in zip(axes[0], panels):
        bar_h = 0.8 / len(shown)
        for i, s in enumerate(shown):
            ys = [j + i * bar_h for j in range(len(keys))]
            vals = [get(k, s) for k in keys]
            ax.barh([y for y, v in zip(ys, vals) if v], [v for v in vals if v], height=bar_h,
                    color=colors.get(s), label=s)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - bar_h / 2 for j in range(len(keys))])
        ax.set_yticklabels(keys, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"overlayfuse benchmark, {meta['date'][:16]}, kernel {meta['kernel']}"
                 f"{', quick sizes' if meta['quick'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
