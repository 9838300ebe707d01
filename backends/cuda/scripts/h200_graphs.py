#!/usr/bin/env python3
"""Decode CUDA graphs in the engine on a GPU: ``dsv bench offline --device cuda`` on the embedded default model,
with and without ``--disable-cuda-graph``, comparing greedy outputs and throughput.

    python backends/cuda/scripts/h200_graphs.py --out $OUT/h200_graphs.json

Needs dsv and dsv-cuda installed (``pip install -e . -e backends/cuda``). Each pair runs in its own
processes (one engine each); bf16 first, then float32 (where different batch shapes round alike, so any
token difference points at the graphs, not at GEMM tiling). The JSON holds, per dtype, both bench results
(throughput, graph/eager step counts, the captured sizes) and the token comparison. Exit status 1 when a
run fails, graphs were not replayed, or float32 outputs differ. About 1-2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = ["--num-prompts", "30", "--input-len", "100", "--output-len", "48", "--cuda-graph-max-bs", "32"]


def bench(device: str, dtype: str, graphs: bool, tmp: Path, timeout: int) -> dict:
    """One ``dsv bench offline`` run; its JSON line plus the output token ids and the stderr tail."""
    ids_file = tmp / f"{dtype}-{'graphs' if graphs else 'eager'}.json"
    cmd = [sys.executable, "-m", "dsv.server.cli", "bench", "offline", "--device", device, "--dtype", dtype]
    cmd += [*BENCH, "--json", "--save-outputs", str(ids_file)]
    if not graphs:
        cmd.append("--disable-cuda-graph")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    run = {"cmd": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    run["stderr_tail"] = proc.stderr[-1500:]
    if proc.returncode == 0:
        run["result"] = json.loads(proc.stdout.strip().splitlines()[-1])
        run["tokens"] = json.loads(ids_file.read_text())
    return run


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences, and where the others first differ."""
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    diverged = [(k, i) for k, i in enumerate(first) if i is not None or len(a[k]) != len(b[k])]
    return {
        "sequences": len(a),
        "identical": len(a) - len(diverged),
        "first_divergence": diverged[:10],  # (prompt, token index)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per bench run")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script (no graphs there)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict = {"bench_args": " ".join(BENCH), "runs": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            graphs = bench(args.device, dtype, True, Path(tmp), args.timeout)
            eager = bench(args.device, dtype, False, Path(tmp), args.timeout)
            entry = {"graphs": graphs, "eager": eager}
            if graphs["rc"] == 0 and eager["rc"] == 0:
                cmp = compare(graphs.pop("tokens"), eager.pop("tokens"))
                g, e = graphs["result"], eager["result"]
                cmp["output_tok_s"] = {"graphs": g["output_tokens_per_s"], "eager": e["output_tokens_per_s"]}
                cmp["speedup"] = round(g["output_tokens_per_s"] / e["output_tokens_per_s"], 2)
                cmp["graph_steps"] = g["steps"]
                entry["comparison"] = cmp
                replayed = g["steps"].get("decode_runner", 0) > 0 and e["steps"].get("decode_runner", 0) == 0
                same = cmp["identical"] == cmp["sequences"]
                ok &= replayed and (same or dtype != "float32")
                print(f"{dtype}: {cmp}", flush=True)
            else:
                ok = False
                print(f"{dtype}: a run failed\n{graphs['stderr_tail']}\n{eager['stderr_tail']}", flush=True)
            report["runs"][dtype] = entry
    report["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
