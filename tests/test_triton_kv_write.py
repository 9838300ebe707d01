"""Triton KV-cache writes and FP8 quantization against the reference: byte-identical results.

Runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported); with
TRITON_INTERPRET=0 on a machine with a GPU the same tests run the compiled kernels there.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()
import triton  # noqa: E402  (after the interpreter flag is set)

from dsv.kernels.triton import kv_write as kv  # noqa: E402
from dsv.kernels.triton import quant  # noqa: E402
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer  # noqa: E402
from dsv.ops.quant import act_quant as ref_act_quant  # noqa: E402


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def test_e4m3_encoding_matches_torch_on_every_value_and_midpoint() -> None:
    """Every e4m3 value, every midpoint between neighbours (ties to even) and wide random magnitudes."""
    import triton.language as tl

    @triton.jit
    def encode(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(o_ptr + offs, quant.e4m3fn_bits(x).to(tl.uint8), mask=offs < n)

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~values.isnan()].sort().values
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.full_like(mids, 1e9), torch.full_like(mids, -1e9)
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(20000, generator=gen) * torch.exp(torch.randn(20000, generator=gen) * 4)
    x = torch.cat([values, mids, mids.nextafter(up), mids.nextafter(down), wide, torch.tensor([-0.0, 1e-30])])
    x = x.clamp(-448, 448)
    out = torch.empty(x.numel(), dtype=torch.uint8, device=DEVICE)
    encode[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), out, x.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), _bytes(x.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_is_byte_identical(fmt: str | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(19, 300, generator=gen) * 3).to(dtype)
    x[3] = 0.0  # amax floor
    x[4, :128] *= 1e4
    q, s = quant.act_quant(x.to(DEVICE), 128, fmt)
    rq, rs = ref_act_quant(x, 128, fmt)
    assert torch.equal(_bytes(q), _bytes(rq))
    assert torch.equal(s.cpu(), rs)


def _latents(t: int, r: int, dr: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(t)
    latent = torch.randn(t, r, generator=gen) * torch.logspace(-3, 2, t)[:, None]
    latent[0] = 0.0
    return latent.to(dtype), torch.randn(t, dr, generator=gen).to(dtype)


@pytest.mark.parametrize(
    "layout,cache_dtype,in_dtype,page",
    [
        ("fp8", torch.bfloat16, torch.float32, 1),
        ("fp8", torch.bfloat16, torch.bfloat16, 16),
        ("fp8", torch.float32, torch.float32, 4),
        ("float", torch.bfloat16, torch.float32, 16),  # fp32 -> bf16 rounding (nearest even)
        ("float", torch.float32, torch.float32, 1),
    ],
)
def test_kv_write_matches_reference_bytes(
    layout: str, cache_dtype: torch.dtype, in_dtype: torch.dtype, page: int
) -> None:
    r, dr, pages = 256, 64, 48 // page
    ref = MLACacheLayer(pages, page, r, dr, layout, cache_dtype, "cpu")
    got = MLACacheLayer(pages, page, r, dr, layout, cache_dtype, DEVICE)
    slots = torch.tensor([5, 0, 47, 13, 14, 30, 2])
    latent, rope = _latents(len(slots), r, dr, in_dtype)
    ref.write(slots, latent, rope)
    kv.kv_write(got, slots.to(DEVICE), latent.to(DEVICE), rope.to(DEVICE))
    assert torch.equal(_bytes(got.storage), _bytes(ref.storage))


def test_kv_write_skips_padding_slots() -> None:
    got = MLACacheLayer(4, 4, 128, 32, "fp8", torch.bfloat16, DEVICE)
    latent, rope = _latents(3, 128, 32, torch.float32)
    kv.kv_write(got, torch.tensor([-1, 3, -1], device=DEVICE), latent.to(DEVICE), rope.to(DEVICE))
    ref = MLACacheLayer(4, 4, 128, 32, "fp8", torch.bfloat16, "cpu")
    ref.write(torch.tensor([3]), latent[1:2], rope[1:2])
    assert torch.equal(_bytes(got.storage), _bytes(ref.storage))


@pytest.mark.parametrize(
    "quantized,dtype,page",
    [(True, torch.bfloat16, 1), (True, torch.bfloat16, 16), (False, torch.bfloat16, 4)],
)
def test_index_k_write_matches_reference_bytes(quantized: bool, dtype: torch.dtype, page: int) -> None:
    d, pages = 128, 32 // page
    ref = IndexKCacheLayer(pages, page, d, quantized, dtype, "cpu")
    got = IndexKCacheLayer(pages, page, d, quantized, dtype, DEVICE)
    gen = torch.Generator().manual_seed(2)
    slots = torch.tensor([7, 0, 31, 16, 17, 3])
    k = (torch.randn(len(slots), d, generator=gen) * torch.logspace(-4, 3, len(slots))[:, None]).to(dtype)
    ref.write(slots, k)
    kv.index_k_write(got, torch.cat([slots, torch.tensor([-1])]).to(DEVICE), torch.cat([k, k[:1]]).to(DEVICE))
    assert torch.equal(_bytes(got.storage), _bytes(ref.storage))
