"""Median milliseconds of a callable, eager or as a CUDA graph replay, failures reported as text."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Median milliseconds of a zero-argument callable, eagerly and/or as a CUDA graph replay."""

    def __init__(self, device: torch.device, modes: tuple[str, ...], rep_ms: float, cpu_reps: int) -> None:
        self.device = device
        self.modes = modes
        self.rep_ms = rep_ms
        self.cpu_reps = cpu_reps

    def _bench(self, fn: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            fn()  # warm-up (lazy caches such as the absorbed MLA weights)
            times = []
            for _ in range(self.cpu_reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=self.rep_ms, return_mode="median"))

    def eager(self, fn: Callable[[], Any]) -> float | str:
        """Eager time of ``fn``; the error text when it raises (the other figures of the case still run)."""
        try:
            return round(self._bench(fn), 4)
        except Exception as exc:
            traceback.print_exc()
            free_memory(self.device)
            return f"error: {type(exc).__name__}: {str(exc)[:200]}"

    def graph(self, fn: Callable[[], Any]) -> float | str:
        """Replay time of ``fn`` captured in a CUDA graph; the error text when it cannot be captured."""
        from dsv_cuda.graphs import cuda_graph

        try:
            replay, out = cuda_graph(fn, self.device)
        except Exception as exc:  # reported in the results, never replaced by the eager figure
            traceback.print_exc()
            free_memory(self.device)
            return f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
        try:
            return self.eager(replay)
        finally:
            del replay, out

    def measure(self, fn: Callable[[], Any]) -> dict[str, float | str]:
        """{"eager": ms, "graph": ms or error} for the configured modes; eager first, so that Triton compiles
        (and lazy caches fill) on the main stream before any capture."""
        out: dict[str, float | str] = {}
        if "eager" in self.modes:
            out["eager"] = self.eager(fn)
        if "graph" in self.modes:
            out["graph"] = self.graph(fn)
        return out


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
