"""KV-cache writes: the MLA latent cache (float rows or FlashMLA's FP8 656-byte rows) and the indexer key cache.

Byte-identical to :meth:`MLACacheLayer.write` / :meth:`IndexKCacheLayer.write` for every valid slot. Slots < 0
(padding tokens) are skipped, where the reference would wrap around to the last slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels.triton.quant import e4m3fn_bits, quant_group_scale, store_cast, store_view
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer


@triton.jit
def _mla_write_float_kernel(
    out_ptr,
    slot_ptr,
    lat_ptr,
    rope_ptr,
    stride_lat,
    stride_rope,
    R: tl.constexpr,
    DR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    row = out_ptr + slot * (R + DR)
    r = tl.arange(0, BLOCK_R)
    lat = tl.load(lat_ptr + t * stride_lat + r, mask=r < R)
    store_cast(row + r, lat, (r < R) & (r * 0 + slot >= 0), BF16_BITS)
    d = tl.arange(0, BLOCK_DR)
    rope = tl.load(rope_ptr + t * stride_rope + d, mask=d < DR)
    store_cast(row + R + d, rope, (d < DR) & (d * 0 + slot >= 0), BF16_BITS)


@triton.jit
def _mla_write_fp8_kernel(
    bytes_ptr,
    f32_ptr,
    bf16_ptr,
    slot_ptr,
    lat_ptr,
    rope_ptr,
    stride_lat,
    stride_rope,
    R: tl.constexpr,
    DR: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_NT: tl.constexpr,
    BLOCK_DR: tl.constexpr,
):
    # Row layout (WIDTH bytes): R e4m3 | R/128 fp32 scales (amax/448) | DR bf16.
    NT: tl.constexpr = R // 128
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    tile = tl.arange(0, BLOCK_NT)
    col = tl.arange(0, 128)
    offs = tile[:, None] * 128 + col[None, :]
    tmask = tile < NT
    ok = (tile * 0 + slot) >= 0  # masks are built from vectors: the interpreter rejects scalar bool masks
    x = tl.load(lat_ptr + t * stride_lat + offs, mask=tmask[:, None], other=0.0).to(tl.float32)
    scale = quant_group_scale(tl.max(tl.abs(x), axis=1), 448.0, False)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(bytes_ptr + slot * WIDTH + offs, e4m3fn_bits(y).to(tl.uint8), mask=(ok & tmask)[:, None])
    tl.store(f32_ptr + slot * (WIDTH // 4) + R // 4 + tile, scale, mask=ok & tmask)
    d = tl.arange(0, BLOCK_DR)
    rope = tl.load(rope_ptr + t * stride_rope + d, mask=d < DR)
    dmask = (d < DR) & (d * 0 + slot >= 0)
    store_cast(bf16_ptr + slot * (WIDTH // 2) + (R + 4 * NT) // 2 + d, rope, dmask, True)


def kv_write(cache: MLACacheLayer, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> None:
    """Write MLA latents [T, R] and rope keys [T, Dr] at global ``slots`` [T] (same bytes as the reference)."""
    t = slots.shape[0]
    if t == 0:
        return
    r, dr = cache.kv_lora_rank, cache.rope_dim
    latent = latent if latent.stride(-1) == 1 else latent.contiguous()
    rope = rope if rope.stride(-1) == 1 else rope.contiguous()
    flat = cache.flat
    if not flat.is_contiguous():
        raise ValueError("kv_write needs a contiguous cache storage")
    block_dr = triton.next_power_of_2(dr)
    if cache.layout == "fp8":
        width = flat.shape[-1]
        if width % 4:
            raise ValueError(f"FP8 KV rows of {width} bytes are not 4-byte aligned")
        _mla_write_fp8_kernel[(t,)](
            flat,
            flat.view(torch.float32),
            flat.view(torch.int16),
            slots,
            latent,
            rope,
            latent.stride(0),
            rope.stride(0),
            R=r,
            DR=dr,
            WIDTH=width,
            BLOCK_NT=triton.next_power_of_2(r // 128),
            BLOCK_DR=block_dr,
        )
    else:
        out, bf16_bits = store_view(flat)
        _mla_write_float_kernel[(t,)](
            out,
            slots,
            latent,
            rope,
            latent.stride(0),
            rope.stride(0),
            R=r,
            DR=dr,
            BLOCK_R=triton.next_power_of_2(r),
            BLOCK_DR=block_dr,
            BF16_BITS=bf16_bits,
        )


@triton.jit
def _index_k_write_kernel(
    key_ptr,
    scale_ptr,
    slot_ptr,
    k_ptr,
    stride_k,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # Quantized page layout: PAGE * D e4m3 bytes, then PAGE fp32 scales (ue8m0). Else rows of D floats.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = (d < D) & (d * 0 + slot >= 0)
    x = tl.load(k_ptr + t * stride_k + d, mask=d < D, other=0.0)
    if QUANT:
        page = slot // PAGE
        off = slot % PAGE
        xf = x.to(tl.float32)
        scale = quant_group_scale(tl.max(tl.abs(xf), axis=0), 448.0, True)
        y = tl.minimum(tl.maximum(tl.math.div_rn(xf, scale), -448.0), 448.0)
        base = page * (PAGE * (D + 4)) + off * D
        tl.store(key_ptr + base + d, e4m3fn_bits(y).to(tl.uint8), mask=dmask)
        # The scale goes through lane 0 of a vector store (a scalar mask is not portable to the interpreter).
        scale_offs = page * (PAGE * (D + 4) // 4) + PAGE * D // 4 + off + d * 0
        tl.store(scale_ptr + scale_offs, scale + d * 0.0, mask=dmask & (d == 0))
    else:
        store_cast(key_ptr + slot * D + d, x, dmask, BF16_BITS)


def index_k_write(cache: IndexKCacheLayer, slots: torch.Tensor, k: torch.Tensor) -> None:
    """Write rotated indexer keys [T, D] at global ``slots`` [T] (FP8 + ue8m0 scale when quantized)."""
    t = slots.shape[0]
    if t == 0:
        return
    d = cache.head_dim
    k = k if k.stride(-1) == 1 else k.contiguous()
    storage = cache.storage
    if not storage.is_contiguous():
        raise ValueError("index_k_write needs a contiguous cache storage")
    if cache.quantized:
        if d % 4:
            raise ValueError(f"quantized indexer keys need head_dim % 4 == 0, got {d}")
        key_ptr, scale_ptr, bf16_bits = storage, storage.view(torch.float32), False
    else:
        key_ptr, bf16_bits = store_view(storage)
        scale_ptr = key_ptr
    _index_k_write_kernel[(t,)](
        key_ptr,
        scale_ptr,
        slots,
        k,
        k.stride(0),
        D=d,
        PAGE=cache.page_size,
        BLOCK_D=triton.next_power_of_2(d),
        QUANT=cache.quantized,
        BF16_BITS=bf16_bits,
    )
