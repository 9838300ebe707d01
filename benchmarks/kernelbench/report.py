"""Output: the printed lines of a case and the JSON document (rewritten after every case)."""

from __future__ import annotations

import json
import os
from typing import Any

from .roofline import BF16_FLOPS, FP8_FLOPS, HBM_BPS


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['family']:24s} {row['case']:28s}"
    if "failed" in row:
        print(f"{head} FAILED {row['failed'][:200]}", flush=True)
        return
    print(f"{head} roofline {row['roofline_ms']:.4f} ms", flush=True)
    for name, res in row["results"].items():
        if "failed" in res:
            print(f"    {name:20s} FAILED {res['failed'][:200]}", flush=True)
            continue
        tf = f"{res['tflops']:8.1f} TFLOPS" if "tflops" in res else f"{res['gbps']:8.0f} GB/s  "
        err = f"err {res['error']:.2e} vs {res['error_vs']}" if "error" in res else ""
        graph = f"graph {res['graph_ms']:.4f} ms " if "graph_ms" in res else ""
        print(
            f"    {name:20s} {res['ms']:10.4f} ms {tf} {100 * res['roof_frac']:6.1f}% roof  {graph}{err}",
            flush=True,
        )
        for kname, us in res.get("kernels_us", []):
            print(f"        {us:10.1f} us  {kname[:100]}")
    for name, why in row.get("skipped", {}).items():
        print(f"    {name:20s} skipped: {why[:150]}", flush=True)


def write_json(path: str, env: dict[str, Any], kernels: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    doc = {
        "env": env,
        "peaks": {"hbm_bps": HBM_BPS, "bf16_flops": BF16_FLOPS, "fp8_flops": FP8_FLOPS},
        "kernels": kernels,
        "rows": rows,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
