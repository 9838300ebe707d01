"""Normalizations and the Walsh-Hadamard rotation used by the indexer."""

from __future__ import annotations

import functools

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, result in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (with bias) computed in fp32, result in x's dtype (the indexer's ``k_norm``)."""
    out = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=8)
def _hadamard(n: int, device_type: str) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:  # Sylvester construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(device_type)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / sqrt(n) over the last dim (orthonormal; preserves dot products), fp32 math."""
    h = _hadamard(x.shape[-1], x.device.type).to(x.device)
    return (x.float() @ h).to(x.dtype)
