"""Small tensor helpers shared by the adapters (vendor import, index compaction, padding)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from dsv.backend.interface import KernelUnavailable
from dsv.ops.quant import act_quant


def import_vendor(modules: tuple[str, ...], what: str) -> ModuleType:
    """The first importable module of ``modules``; :class:`KernelUnavailable` naming them otherwise.

    No caching of our own: ``sys.modules`` already caches, and contract tests swap stand-ins in there.
    """
    errors = []
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise KernelUnavailable(f"{what} needs one of {', '.join(modules)}; none imports ({'; '.join(errors)})")


def vendor_fn(mod: ModuleType, *names: str):
    """The first attribute of ``mod`` among ``names`` (libraries rename entry points between versions)."""
    for name in names:
        fn = getattr(mod, name, None)
        if fn is not None:
            return fn
    raise KernelUnavailable(f"{mod.__name__} has none of {', '.join(names)}: unsupported version")


def arch_major(device: torch.device) -> int:
    """SM major of ``device``; 9 (Hopper) off-GPU so that contract tests see the H200 code path."""
    if device.type != "cuda":
        return 9
    return torch.cuda.get_device_capability(device)[0]


def compact_valid_first(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid (>= 0) entries to the front, keeping their order.

    Returns (indices int32 [..., K] with -1 after the valid ones, counts int32 [...]). No host sync,
    so it can run inside a CUDA graph.
    """
    invalid = (indices < 0).to(torch.int8)
    order = torch.argsort(invalid, dim=-1, stable=True)
    compact = torch.gather(indices, -1, order).to(torch.int32)
    counts = (indices >= 0).sum(-1, dtype=torch.int32)
    return compact.masked_fill(compact < 0, -1), counts


def pad_last(x: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    """Pad the last dim of ``x`` with ``value`` up to a multiple of ``multiple``."""
    rem = (-x.shape[-1]) % multiple
    if rem == 0:
        return x
    return torch.nn.functional.pad(x, (0, rem), value=value)


def pad_heads(q: torch.Tensor, heads: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad the head dim of ``q`` to ``heads`` (zero queries produce outputs we slice away)."""
    have = q.shape[dim]
    if have == heads:
        return q
    shape = list(q.shape)
    shape[dim] = heads
    out = q.new_zeros(shape)
    out.narrow(dim, 0, have).copy_(q)
    return out


def zero_rows_without_keys(out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows with no valid key are 0 in the reference; kernels may leave NaN there."""
    empty = (counts == 0).view(-1, *([1] * (out.dim() - 1)))
    return out.masked_fill(empty, 0.0)


@functools.lru_cache(maxsize=1)
def _triton_act_quant() -> Callable | None:
    try:
        from dsv.kernels.triton.quant import act_quant as triton_act_quant
    except Exception:  # no Triton, or an older dsv without it
        return None
    return triton_act_quant


@functools.lru_cache(maxsize=1)
def triton_linear() -> Callable | None:
    """dsv's Triton kernel for the ``linear`` op (the kernel table's entry), None without a usable Triton."""
    from dsv_cuda.libraries import triton_kernels

    table, ok, _ = triton_kernels()
    return table.get("linear") if ok else None


def quantize_activations(
    x: torch.Tensor, block: int, scale_fmt: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``block`` activation quantization (``dsv.ops.quant.act_quant`` semantics): dsv's Triton kernel on a
    GPU (one launch, byte-identical to the reference), the torch reference elsewhere."""
    fn = _triton_act_quant() if x.is_cuda else None
    return (fn or act_quant)(x, block, scale_fmt)
