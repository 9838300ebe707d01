"""Op tables of a run: the backend's table per KV dtype, the dense-mode indexer stand-in, the op call recorder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from dsv.backend.interface import Kernel, OpTable
from dsv.ops.metadata import AttentionMetadata

from .settings import Settings


def all_positions_topk(
    q: torch.Tensor, weights: torch.Tensor, cache: Any, meta: AttentionMetadata, topk: int
) -> torch.Tensor:
    """``indexer_topk_decode`` for a fully dense step: every visible position (0..pos) of each token's
    sequence, -1 after, without scoring (what the real op returns, in another order, when topk >= seq_len)."""
    pos = torch.arange(topk, device=meta.positions.device, dtype=torch.int32)
    return torch.where(pos[None, :] <= meta.positions[:, None], pos[None, :], -1)


def replace_kernel(ops: OpTable, op: str, name: str, fn: Callable[..., Any]) -> OpTable:
    kernels = dict(ops.kernels)
    kernels[op] = Kernel(op=op, name=name, fn=fn, description="slice benchmark stand-in")
    return OpTable(kernels)


class Recorder:
    """Wraps chosen ops of a table to keep the arguments of their last call (to time the op alone)."""

    def __init__(self, ops: OpTable, names: tuple[str, ...]) -> None:
        self.calls: dict[str, tuple[Callable[..., Any], tuple, dict]] = {}
        kernels = dict(ops.kernels)
        for op in names:
            kernels[op] = dataclasses.replace(kernels[op], fn=self._wrap(op, kernels[op].fn))
        self.ops = OpTable(kernels)

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[op] = (fn, args, kwargs)
            return fn(*args, **kwargs)

        return call


def parse_kernel_choices(items: list[str]) -> dict[str, str]:
    """``op=name`` pairs (repeatable and/or comma-separated) -> {op: name}."""
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            op, sep, name = pair.partition("=")
            if not sep or not op.strip() or not name.strip():
                raise SystemExit(f"--kernels takes op=name pairs, got {pair!r}")
            out[op.strip()] = name.strip()
    return out


def ops_for(s: Settings, kv_dtype: str) -> OpTable:
    """The backend's op table for ``kv_dtype`` with the run's kernel choices (raises on a bad choice)."""
    config = {
        "kv_cache_dtype": kv_dtype,
        "page_size": s.page_size,
        "indexer_quant": s.indexer_quant,
        "dtype": "bfloat16",
    }
    return s.backend.ops(s.choices, config)
