"""Median milliseconds of a call (do_bench, CUDA events or wall clock), CUDA-graph replays, profiled kernels."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

SLOW_MS = 20.0  # calls slower than this are timed by three CUDA-event runs instead of do_bench


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], dev: str, rep_ms: float) -> float:
    """Median ms of ``fn``: do_bench (warmup 5 ms, ``rep_ms``) for fast calls, three event-timed runs for slow
    ones (a do_bench of a 300 ms reference would take seconds), one wall-clock run on the CPU."""
    fn()
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    once = (time.perf_counter() - t0) * 1e3
    if dev != "cuda":
        return once
    if once > SLOW_MS:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))


def graph_time(call: Callable[[], Any], rep_ms: float) -> dict[str, Any]:
    """Median ms of ``call`` replayed from a CUDA graph (kernel time without launch overhead), or why not."""
    import triton.testing

    try:
        return {"graph_ms": float(triton.testing.do_bench_cudagraph(call, rep=rep_ms, return_mode="median"))}
    except Exception as exc:  # e.g. a host sync inside the op (the torch references)
        torch.cuda.synchronize()
        return {"graph_failed": f"{type(exc).__name__}: {exc}"[:500]}


def profile_kernels(call: Callable[[], Any], calls: int = 3, cuda: bool = True) -> list[dict[str, Any]]:
    """What ``call`` runs, from torch.profiler over ``calls`` calls, slowest first: per GPU kernel its name
    ("kernel"), launches per call ("calls") and device µs per call ("us"); with ``cuda=False`` the torch ops'
    self CPU time instead (the CPU backend has no kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / calls
        if us > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"kernel": e.key, "calls": e.count / calls, "us": us})
    return sorted(rows, key=lambda r: -r["us"])


def kernel_times(call: Callable[[], Any], calls: int = 3) -> list[tuple[str, float]]:
    """The 8 slowest GPU kernels ``call`` launches with their mean µs per call."""
    return [(r["kernel"], r["us"]) for r in profile_kernels(call, calls)[:8]]
