"""The CUDA backend's kernel table and the implementations of it that a case times or skips."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .case import Case


def kernel_table(dev: str, arch: tuple[int, int] | None) -> dict[str, list[Any]]:
    """The CUDA backend's kernels per op (``dsv_cuda.kernels.build_kernels``, as ``CudaBackend`` builds them)."""
    from dsv_cuda.kernels import build_kernels
    from dsv_cuda.libraries import device_arch

    return build_kernels(arch if arch is not None else (device_arch(dev) if dev == "cuda" else None))


def implementations(
    case: Case, table: dict[str, list[Any]]
) -> tuple[list[tuple[str, Callable]], dict[str, str]]:
    """(name, fn) of every kernel to time for ``case`` (reference first), and the skipped ones with reasons."""
    from dsv_cuda.requirements import KernelConfig, unmet

    cfg = KernelConfig.from_dict(case.config)
    run: list[tuple[str, Callable]] = []
    skipped: dict[str, str] = {}
    for k in table.get(case.op, []):
        if k.name == "torch":
            if case.ref_skip:
                skipped["torch"] = case.ref_skip
            else:
                run.insert(0, ("torch", k.fn))
            continue
        if not k.available:
            skipped[k.name] = f"unavailable: {k.reason}"
        elif why := unmet(case.op, k.name, cfg):
            skipped[k.name] = "; ".join(why)
        else:
            run.append((k.name, k.fn))
    # The first to run is the others' error basis: the reference, else dsv's Triton twin of it (same math).
    run.sort(key=lambda item: {"torch": 0, "triton": 1}.get(item[0], 2))
    return run, skipped
