"""Weight-holding building blocks of the model. Parameter names follow the Hugging Face checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from dsv.backend.interface import OpTable
from dsv.config import ModelConfig
from dsv.ops.quant import weight_dequant


class Linear(nn.Module):
    """A bias-free linear layer whose weight is float or block-FP8 (with ``weight_scale_inv``)."""

    def __init__(self, in_features: int, out_features: int, fp8: bool, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block = cfg.quant.block_size if (fp8 and cfg.quant) else (128, 128)
        self.act_scale_fmt = cfg.quant.scale_fmt if (fp8 and cfg.quant) else None
        if fp8:
            bo, bi = self.block
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn), requires_grad=False
            )
            self.weight_scale_inv = nn.Parameter(
                torch.empty(-(-out_features // bo), -(-in_features // bi), dtype=torch.float32),
                requires_grad=False,
            )
        else:
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
            )
            self.weight_scale_inv = None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        return ops.linear(x, self.weight, self.weight_scale_inv, self.block, self.act_scale_fmt)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a float tensor (dequantized when FP8)."""
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        return weight_dequant(self.weight, self.weight_scale_inv, self.block, dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), the product formed in fp32."""

    def __init__(self, cfg: ModelConfig, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        fp8 = cfg.quant is not None
        self.gate_proj = Linear(hidden, inter, fp8, cfg, dtype)
        self.up_proj = Linear(hidden, inter, fp8, cfg, dtype)
        self.down_proj = Linear(inter, hidden, fp8, cfg, dtype)

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x, ops).float()) * self.up_proj(x, ops).float()
        return self.down_proj(h.to(x.dtype), ops)
