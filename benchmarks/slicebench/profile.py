"""Where a block's time goes: the kernels of a few eager runs, summed by name (torch.profiler)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_table(fn: Callable[[], Any], device: torch.device, iters: int, top: int = 30) -> dict[str, Any]:
    """Per-iteration time and launch count of the ``top`` most expensive kernels of ``fn`` (device time on a
    GPU, self CPU time otherwise), plus their total and the number of kernels per call.

    Eager runs: a kernel's device time is the same as inside a CUDA graph, and the kernel count says how many
    launches a graph still replays (each costs a few microseconds of gaps even there).
    """
    cuda = device.type == "cuda"
    fn()  # warm-up outside the trace (compilation, lazy caches)
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / iters
        if us <= 0 or (cuda and e.device_type != torch.autograd.DeviceType.CUDA):
            continue
        rows.append({"kernel": e.key[:160], "calls": e.count / iters, "us": round(us, 2)})
    rows.sort(key=lambda r: -r["us"])
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
