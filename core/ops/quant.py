"""FP8 quantization math shared by every backend: block-scaled weights, activation groups, KV layouts.

These are the numerical definitions (DeepSeek's ``act_quant`` / ``weight_dequant`` and FlashMLA's 656-byte
KV layout); kernels elsewhere must agree with them.
"""

from __future__ import annotations

import functools

import torch

FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def fp8_dtype_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 240 for e4m3fnuz)."""
    return float(torch.finfo(dtype).max)


def ue8m0_round(scale: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to the next power of two (exactly, on the exponent bits)."""
    bits = scale.float().contiguous().view(torch.int32)
    # Adding all-ones mantissa bits carries into the exponent exactly when the mantissa is non-zero; masking
    # the mantissa off then leaves 2^ceil(log2 scale). Two integer ops (this runs once per FP8 linear).
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def fresh_temporary(result: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether an op may finish its work in place on ``result``: a new tensor it made (not ``source`` itself),
    outside torch.compile (whose graphs keep the out-of-place form for inductor to fuse). On the CPU each
    large fresh temporary is a new mmap whose first touch page-faults, so reusing the copy an op already made
    saves that cost; the values are the same."""
    return result is not source and not torch.compiler.is_compiling()


def act_quant(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = None, fp8: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of ``x`` in groups of ``block``: returns (fp8 values, fp32 scales [..., n/block]).

    scale = max(amax, 1e-4) / fp8_max, rounded up to a power of two when ``scale_fmt == "ue8m0"``.
    A ragged last group (n % block != 0) gets its own scale.
    """
    n = x.shape[-1]
    groups = -(-n // block)
    pad = groups * block - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.view(*x.shape[:-1], groups, block)
    scale = _group_scale(xg, fp8, scale_fmt)
    limit = fp8_dtype_max(fp8)
    scaled = xg.div_(scale.unsqueeze(-1)) if fresh_temporary(xf, x) else xg / scale.unsqueeze(-1)
    q = scaled.clamp_(-limit, limit).to(fp8)
    q = q.view(*x.shape[:-1], groups * block)
    return (q[..., :n] if pad else q), scale


def _group_scale(xg: torch.Tensor, fp8: torch.dtype, scale_fmt: str | None) -> torch.Tensor:
    """Scales [..., groups] of grouped values [..., groups, block]: max(amax, 1e-4) / fp8_max (ue8m0: 2^ceil)."""
    scale = xg.abs().amax(dim=-1).clamp_min_(AMAX_FLOOR).div_(fp8_dtype_max(fp8))
    return ue8m0_round(scale) if scale_fmt == "ue8m0" else scale


#: Below this many values the per-op overhead of :func:`fp8_to_float`'s bit path outweighs its speed.
_FP8_BITS_MIN = 1 << 14


@functools.lru_cache(maxsize=1)
def _e4m3_table() -> torch.Tensor:
    """fp32 value of each of the 256 e4m3fn codes (NaN codes included), as torch widens them."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """``q.float()``, exactly, for any fp8 tensor; e4m3fn on the CPU takes a faster path.

    torch widens e4m3fn to fp32 element by element on the CPU (about 2 ns a value, the cost of reading the
    indexer's key cache). The same bits, shifted into an fp16 (``s eeee mmm`` -> ``s 0eeee mmm0000000``), are
    the value times 2^-8 (subnormals included, as fp16 has them too), and fp16 -> fp32 is vectorized: about
    3x faster. The two NaN codes (0x7F, 0xFF) come out as +-480, past every finite e4m3 value: one min/max
    pass finds them, and they are set back to NaN.
    """
    if q.dtype != torch.float8_e4m3fn or q.device.type != "cpu" or torch.compiler.is_compiling():
        return q.float()  # compiled: inductor writes the widening itself
    if q.numel() < _FP8_BITS_MIN:
        # A 256-entry table (torch's own widening of every code) gathered by byte: half the time of
        # q.float() on the small activations of a CPU decode step.
        return _e4m3_table().index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)
    byte = q.view(torch.uint8)
    b = byte.to(torch.int16)
    # The sign (0x80 * 256 = 0x8000) wraps into bit 15 of the int16, which is the fp16 sign bit. In place on
    # the fresh int16 copy: fewer large temporaries.
    sign = (b & 0x80).mul_(256)
    half = b.bitwise_and_(0x7F).mul_(128).bitwise_or_(sign).view(torch.float16)
    out = half.float().mul_(256.0)
    lo, hi = torch.aminmax(out)
    if hi > FP8_E4M3_MAX or lo < -FP8_E4M3_MAX:  # only the NaN codes widen past +-448 (to +-480)
        out.masked_fill_(out.abs() > FP8_E4M3_MAX, float("nan"))
    return out


def act_dequant(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of :func:`act_quant` in fp32."""
    n = q.shape[-1]
    if n % block == 0:  # whole groups: broadcast each scale over its group instead of expanding the scales
        values = fp8_to_float(q)
        grouped = values.view(*q.shape[:-1], n // block, block)
        # The widened copy takes the scales in place when that keeps the result's dtype.
        owned = fresh_temporary(values, q) and values.dtype == scale.dtype == torch.float32
        scaled = grouped.mul_(scale.unsqueeze(-1)) if owned else grouped * scale.unsqueeze(-1)
        return scaled.view(q.shape)
    expanded = scale.repeat_interleave(block, dim=-1)[..., :n]
    return fp8_to_float(q) * expanded


def quant_roundtrip(
    x: torch.Tensor, block: int = 128, scale_fmt: str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x`` after FP8 quantization and dequantization (what an FP8 kernel sees), in ``dtype`` (default:
    ``x``'s). fp32 keeps fp8 value x scale unrounded, as an FP8 GEMM applies the scales in fp32; with ue8m0
    (power-of-two) scales every dtype holds those values exactly."""
    q, s = act_quant(x, block, scale_fmt)
    return act_dequant(q, s, block).to(x.dtype if dtype is None else dtype)


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype=torch.float32
) -> torch.Tensor:
    """Dequantize a block-FP8 weight [..., out, in]: ``w[..., i, j] * scale_inv[..., i // bo, j // bi]``.

    Leading dimensions (stacked experts) are kept; ragged last blocks are fine.
    """
    out_f, in_f = w.shape[-2:]
    bo, bi = block
    expected = (*w.shape[:-2], -(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match {expected} for {tuple(w.shape)}"
        )
    s = scale_inv.float().repeat_interleave(bo, -2)[..., :out_f, :].repeat_interleave(bi, -1)[..., :in_f]
    return (w.float() * s).to(dtype)


def weight_quant(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a float weight to e4m3 with fp32 ``weight_scale_inv`` (amax/448 per block)."""
    out_f, in_f = w.shape
    bo, bi = block
    ro, ri = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(ro * bo, ri * bi, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(ro, bo, ri, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
    scale = amax / FP8_E4M3_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(ro * bo, ri * bi)[:out_f, :in_f].contiguous(), scale


# ----- MLA latent cache in FlashMLA's FP8 layout -----
# Per token: kv_lora_rank e4m3 bytes | kv_lora_rank/128 fp32 scales (amax/448, not rounded) | rope bf16 values.
# For DeepSeek-V3.2 (512 + 64) this is 512 + 16 + 128 = 656 bytes.


def fp8_kv_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes per token of the FP8 MLA cache layout (656 for 512 + 64)."""
    if kv_lora_rank % 128:
        raise ValueError(f"the FP8 KV layout needs kv_lora_rank % 128 == 0, got {kv_lora_rank}")
    return kv_lora_rank + (kv_lora_rank // 128) * 4 + rope_dim * 2


def pack_fp8_kv(latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Pack [T, R] latents and [T, Dr] rope keys into [T, fp8_kv_bytes] uint8 rows."""
    t, r = latent.shape
    q, s = act_quant(latent, 128, None)
    return torch.cat(
        [
            q.view(torch.uint8),
            s.contiguous().view(torch.uint8).view(t, -1),
            rope.to(torch.bfloat16).contiguous().view(torch.uint8).view(t, -1),
        ],
        dim=1,
    )


def unpack_fp8_kv(rows: torch.Tensor, kv_lora_rank: int, rope_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Dequantize [N, bytes] uint8 rows to [N, kv_lora_rank + rope_dim] in ``dtype``."""
    n = rows.shape[0]
    r = kv_lora_rank
    n_scales = r // 128
    q = rows[:, :r].contiguous().view(torch.float8_e4m3fn)
    s = rows[:, r : r + 4 * n_scales].contiguous().view(torch.float32).view(n, n_scales)
    rope = rows[:, r + 4 * n_scales : r + 4 * n_scales + 2 * rope_dim].contiguous().view(torch.bfloat16)
    return torch.cat([act_dequant(q, s, 128), rope.float()], dim=1).to(dtype)
