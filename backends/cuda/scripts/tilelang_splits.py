#!/usr/bin/env python3
"""Split-KV factor of dsv's TileLang sparse MLA decode: every factor at several batch sizes, bf16 and FP8 KV.

    python backends/cuda/scripts/tilelang_splits.py [--batches 8,16,32,48,64] [--splits 1,2,4,8] [--out r.json]

Decode shapes of DeepSeek-V3.2 (H = 128, top-k 2048, each sequence's own 4096 cached tokens, random slots).
Per (KV format, batch, splits): the output's first rows against the torch reference (tilelang_check.py's
bound), then the median of CUDA graph replays (what a decode step sees). The row marked ``plan`` is the factor
:func:`dsv_cuda.tilelang.sparse_mla.plan` picks for that batch; the evidence behind ``SPLIT_CHOICES``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tilelang_check import (  # noqa: E402  (the check script beside this one)
    SM_SCALE,
    compare,
    graph_us,
    make_cache,
    make_fp8_cache,
    make_indices,
    make_q,
    reference,
)

TOPK, HEADS = 2048, 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="8,16,32,48,64")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--formats", default="bf16,fp8")
    ap.add_argument("--out")
    args = ap.parse_args()
    from dsv_cuda.tilelang.sparse_mla import BLOCK_H, BLOCK_I, plan, sparse_mla

    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    rows, ok = [], True
    for fmt in args.formats.split(","):
        for b in [int(x) for x in args.batches.split(",")]:
            slots = b * 4096
            cache = make_fp8_cache(slots, 1) if fmt == "fp8" else make_cache(slots, 1)
            q, idx = make_q(b, HEADS, 2), make_indices(b, TOPK, slots, 3)
            ref = reference(q, cache, idx, SM_SCALE)
            chosen = plan(b, HEADS, TOPK, sms, None, BLOCK_I, BLOCK_H).splits
            for s in [int(x) for x in args.splits.split(",")]:
                row: dict = {"kv": fmt, "batch": b, "splits": s, "plan": s == chosen}
                try:
                    run = functools.partial(sparse_mla, q, cache, idx, SM_SCALE, splits=s)
                    row.update(compare(run(), ref))
                    row["graph_us"] = graph_us(run)[0]
                except Exception as exc:  # e.g. a factor the FP8 "ws" producer does not take
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    traceback.print_exc()
                ok = ok and (row["ok"] or "error" in row)
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"sms": sms, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
