"""One case run: every implementation called, checked against the basis, timed and set against the roofline."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch

from .case import Case
from .roofline import roofline_ms
from .table import implementations
from .timing import graph_time, kernel_times, sync, timeit


@dataclass(frozen=True)
class Options:
    rep_ms: float
    graphs: bool = False
    profile: bool = False


def run_case(case: Case, table: dict[str, list[Any]], dev: str, opts: Options) -> dict[str, Any]:
    row: dict[str, Any] = {
        "family": case.family,
        "case": case.name,
        "x": case.x,
        "op": case.op,
        "bytes": case.nbytes,
        "flops": case.flops,
        "peak_flops": case.peak,
        "roofline_ms": roofline_ms(case.nbytes, case.flops, case.peak),
        "results": {},
    }
    try:
        args = case.setup(dev)
        impls, skipped = implementations(case, table) if case.table else ([], {})
        impls += list(case.extras.items())  # built inside the try below: a failing extra fails alone
        checked = set() if case.table else set(case.extras)  # sweep variants are compared with each other
        row["skipped"] = skipped
        compare = case.compare(args)
        basis: tuple[str, Any] | None = None
        for name, fn in impls:
            compared = name not in case.extras or name in checked
            res: dict[str, Any] = {}
            try:
                call = fn(args) if name in case.extras else (lambda fn=fn: fn(*args))
                if case.reset is not None:
                    case.reset(args)
                out = case.output(args, call())
                sync(dev)
                if compared:
                    if basis is None:
                        basis = (name, out)
                    else:
                        res["error"] = compare(out, basis[1])
                        res["error_vs"] = basis[0]
                del out
                ms = timeit(call, dev, opts.rep_ms)
                res["ms"] = ms
                if case.flops:
                    res["tflops"] = case.flops / ms / 1e9
                res["gbps"] = case.nbytes / ms / 1e6
                res["roof_frac"] = row["roofline_ms"] / ms
                if opts.graphs and dev == "cuda" and ms < 5:
                    res.update(graph_time(call, opts.rep_ms))
                if opts.profile and dev == "cuda":
                    res["kernels_us"] = kernel_times(call)
            except Exception as exc:  # one kernel failing must not stop the others
                res["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
                res["traceback"] = traceback.format_exc(limit=4)[-3000:]
            row["results"][name] = res
            call = None  # the closure may hold big buffers (prepared GEMM inputs)
            if dev == "cuda":
                try:  # a sticky CUDA error (illegal address) surfaces here; the next kernel reports it too
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as exc:
                    res.setdefault("failed", f"after the call: {type(exc).__name__}: {exc}"[:2000])
    except Exception as exc:  # the case itself (inputs, comparison set-up) failed
        row["failed"] = f"{type(exc).__name__}: {exc}"[:2000]
        row["traceback"] = traceback.format_exc(limit=6)[-3000:]
    finally:
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row
