"""One case of the benchmark: the op, how to build its arguments, its bytes and FLOPs, how to check it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .compare import rel_err


@dataclass
class Case:
    """One size of one family: the op's arguments and what bounds it.

    ``args`` is built by ``setup(dev)`` and passed to every implementation as ``fn(*args)`` (the op contract,
    ``dsv.backend.reference.REFERENCE_OPS``). ``ref_skip`` (a reason) skips the torch reference.
    """

    family: str
    name: str
    x: float | str  # the plot's x value: a size, or a label for categorical families
    op: str
    setup: Callable[[str], tuple]
    nbytes: float
    flops: float
    peak: float
    compare: Callable[[tuple], Callable[[Any, Any], float]] = lambda args: rel_err
    ref_skip: str = ""
    extras: dict[str, Callable[[tuple], Callable[[], Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # validate-style keys the kernels must serve
    output: Callable[[tuple, Any], Any] = lambda args, ret: ret  # what to compare, from (args, return value)
    reset: Callable[[tuple], Any] | None = None  # run before each implementation's checked call
    table: bool = True  # time the kernel table's implementations of ``op`` (False: only ``extras``)


def sweep_variants(case: Case, fn: Callable, grid: list[tuple], keys: dict[str, str]) -> Case:
    """``case`` timing ``fn(*args, **kw)`` once per row of ``grid`` (``--sweep``) instead of the kernel table.

    ``keys`` maps each keyword to its short label: (64, 128) with {"block_m": "m", "block_n": "n"} is "m64 n128".
    """
    case.extras = {}
    for values in grid:
        kw = dict(zip(keys, values))
        name = " ".join(f"{short}{v}" for short, v in zip(keys.values(), values))
        case.extras[name] = lambda a, kw=kw: lambda: fn(*a, **kw)
    case.table = False
    return case
