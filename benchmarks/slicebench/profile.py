"""Where a block's time goes: the kernels of a few eager runs, summed by name (torch.profiler)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kernelbench.timing import profile_kernels


def kernel_table(fn: Callable[[], Any], device: torch.device, iters: int, top: int = 30) -> dict[str, Any]:
    """Per-iteration time and launch count of the ``top`` most expensive kernels of ``fn`` (device time on a
    GPU, self CPU time otherwise; :func:`kernelbench.timing.profile_kernels`), plus their total and the
    number of kernels per call.

    Eager runs: a kernel's device time is the same as inside a CUDA graph, and the kernel count says how many
    launches a graph still replays (each costs a few microseconds of gaps even there).
    """
    cuda = device.type == "cuda"
    fn()  # warm-up outside the trace (compilation, lazy caches)
    if cuda:
        torch.cuda.synchronize(device)
    rows = [
        {"kernel": r["kernel"][:160], "calls": r["calls"], "us": round(r["us"], 2)}
        for r in profile_kernels(fn, iters, cuda)
    ]
    return {
        "total_us": round(sum(r["us"] for r in rows), 1),
        "kernels_per_call": sum(r["calls"] for r in rows),
        "top": rows[:top],
    }


def format_table(name: str, table: dict[str, Any], top: int = 15) -> str:
    lines = [f"  {name}: {table['total_us']:.1f} us in {table['kernels_per_call']:.0f} kernels per call"]
    for r in table["top"][:top]:
        lines.append(f"    {r['us']:9.1f} us  x{r['calls']:<5g} {r['kernel'][:110]}")
    return "\n".join(lines)
