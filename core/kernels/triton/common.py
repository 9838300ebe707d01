"""Small helpers shared by the Triton wrappers (dtype mapping, interpreter detection, SM count)."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_dtype(*dtypes: torch.dtype) -> tl.dtype:
    """Operand dtype for tl.dot when the inputs come in ``dtypes``: the common 16-bit float type, else fp32.

    16-bit operands are exact for 16-bit inputs and run on tensor cores (fp32 accumulation). The interpreter's
    bf16 dot multiplies the raw bit patterns, so it computes in fp32 there.
    """
    first = dtypes[0]
    if first in (torch.bfloat16, torch.float16) and all(d == first for d in dtypes) and not interpreting():
        return TL_DTYPES[first]
    return tl.float32


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (compute units) of a GPU, cached per device index."""
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
