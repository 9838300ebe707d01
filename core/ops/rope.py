"""Rotary embeddings: YaRN frequencies, MLA's interleaved rotation and the indexer's half-split (NeoX) one."""

from __future__ import annotations

import math

import torch

from dsv.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2] in fp32, with the YaRN ramp when ``rope.rope_type == "yarn"``.

    YaRN is applied whenever configured (as transformers, SGLang and vLLM do); DeepSeek's demo only applies
    it when its max_seq_len exceeds the original context.
    """
    base = rope.theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope.rope_type != "yarn" or rope.factor <= 1:
        return freqs.float()
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / rope.factor * ramp + freqs * (1 - ramp)
    return freqs.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, dim/2] in fp32 for integer positions [T]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) by angle i (MLA). x: [T, ..., dim]; cos/sin: [T, dim/2]. fp32 math."""
    shape = x.shape
    xf = x.float().reshape(shape[0], -1, shape[-1] // 2, 2)
    c = cos[:, None, :]
    s = sin[:, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)
    return out.reshape(shape).to(x.dtype)


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate element i with i + dim/2 by angle i (the indexer's half-split layout). fp32 math."""
    shape = x.shape
    half = shape[-1] // 2
    xf = x.float().reshape(shape[0], -1, shape[-1])
    c = cos[:, None, :]
    s = sin[:, None, :]
    x0, x1 = xf[..., :half], xf[..., half:]
    out = torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)
    return out.reshape(shape).to(x.dtype)
