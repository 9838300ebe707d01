"""Normalizations and the Walsh-Hadamard rotation used by the indexer."""

from __future__ import annotations

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


#: (size, device type) -> the normalized Hadamard matrix. A plain dict rather than functools.lru_cache, which
#: torch.compile traces through with a warning (the compiled decode forward calls this every layer).
_HADAMARD: dict[tuple[int, str], torch.Tensor] = {}


def _hadamard(n: int, device_type: str) -> torch.Tensor:
    h = _HADAMARD.get((n, device_type))
    if h is not None:
        return h
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < n:  # Sylvester construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = (h / n**0.5).to(device_type)
    _HADAMARD[(n, device_type)] = h
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / sqrt(n) over the last dim (orthonormal; preserves dot products), fp32 math."""
    h = _hadamard(x.shape[-1], x.device.type).to(x.device)
    return (x.float() @ h).to(x.dtype)
