"""PNG plots of a ``benchmarks/kernels.py`` JSON: one figure per family.

Left panel: time per call (µs, log scale) of every implementation against the size, with the roofline time as a
dashed line. Right panel: achieved TFLOPS (GB/s for families without FLOPs, e.g. KV writes) with the peak as a
dashed line. Families whose x values are labels (GEMM shapes) get a categorical axis.

    python benchmarks/plot_kernels.py kernels.json --out-dir plots
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def families(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by family, in file order, without rows that never ran (failed set-up, time budget)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in doc.get("rows", []):
        if "results" in row:
            out[row["family"]].append(row)
    return dict(out)


def series(rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """implementation -> [(row index, value)] for the rows where it ran; ``metric``: "us", "tflops", "gbps"."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, row in enumerate(rows):
        for name, res in row["results"].items():
            if "ms" not in res:
                continue
            value = res["ms"] * 1e3 if metric == "us" else res.get(metric)
            if value is not None:
                out[name].append((i, float(value)))
    return dict(out)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def plot_family(name: str, rows: list[dict[str, Any]], peaks: dict[str, float], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(isinstance(r["x"], (int, float)) for r in rows)
    xs = [r["x"] if numeric else i for i, r in enumerate(rows)]
    has_flops = any(r.get("flops") for r in rows)
    metric, unit = ("tflops", "TFLOPS") if has_flops else ("gbps", "GB/s")
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in ((ax_t, "us"), (ax_r, metric)):
        for impl, points in sorted(series(rows, key).items()):
            ax.plot([xs[i] for i, _ in points], [v for _, v in points], marker="o", label=impl)
    ax_t.plot(xs, [r["roofline_ms"] * 1e3 for r in rows], "k--", label="roofline")
    if has_flops:
        peak = [r["peak_flops"] / 1e12 for r in rows]
        ax_r.plot(xs, peak, "k--", label="peak")
    else:
        ax_r.axhline(peaks.get("hbm_bps", 0) / 1e9, color="k", linestyle="--", label="HBM peak")
    for ax in (ax_t, ax_r):
        if numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(xs, [str(r["x"]) for r in rows], rotation=30, ha="right")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("µs per call")
    ax_r.set_ylabel(unit)
    fig.suptitle(name)
    fig.tight_layout()
    path = out_dir / f"{_slug(name)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="output of benchmarks/kernels.py --out")
    ap.add_argument("--out-dir", default="kernel_plots")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.json).read_text())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in families(doc).items():
        print(plot_family(name, rows, doc.get("peaks", {}), out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
