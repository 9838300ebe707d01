"""Mixture of experts: sigmoid router with correction bias, routed experts, one shared expert."""

from __future__ import annotations

import torch
from torch import nn

from dsv.backend.interface import OpTable
from dsv.config import ModelConfig
from dsv.model.layers import MLP
from dsv.ops.moe import ExpertWeights


class Router(nn.Module):
    """``mlp.gate``: logits in fp32, bias used only to choose experts."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype), requires_grad=False
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False
        )


class Experts(nn.Module):
    """Routed experts stacked on the expert axis; the loader fills ``w1[e]`` from ``experts.{e}.gate_proj``."""

    #: checkpoint sub-name -> attribute
    PROJ_TO_ATTR = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        fp8 = cfg.quant is not None
        self.block = cfg.quant.block_size if fp8 else (128, 128)
        self.act_scale_fmt = cfg.quant.scale_fmt if fp8 else None
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        bo, bi = self.block
        for attr, (out_f, in_f) in {"w1": (i, d), "w3": (i, d), "w2": (d, i)}.items():
            self.register_parameter(
                attr, nn.Parameter(torch.empty(e, out_f, in_f, dtype=wdtype), requires_grad=False)
            )
            scale = (
                nn.Parameter(
                    torch.empty(e, -(-out_f // bo), -(-in_f // bi), dtype=torch.float32), requires_grad=False
                )
                if fp8
                else None
            )
            self.register_parameter(f"{attr}_scale", scale)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.w1,
            self.w3,
            self.w2,
            self.w1_scale,
            self.w3_scale,
            self.w2_scale,
            self.block,
            self.act_scale_fmt,
        )

    def checkpoint_targets(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint names (``{prefix}.{e}.gate_proj.weight`` ...) mapped to views of the stacked tensors."""
        targets: dict[str, torch.Tensor] = {}
        for proj, attr in self.PROJ_TO_ATTR.items():
            w, s = getattr(self, attr), getattr(self, f"{attr}_scale")
            for e in range(w.shape[0]):
                targets[f"{prefix}.{e}.{proj}.weight"] = w[e]
                if s is not None:
                    targets[f"{prefix}.{e}.{proj}.weight_scale_inv"] = s[e]
        return targets


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg, dtype)
        self.experts = Experts(cfg, dtype)
        self.shared_experts = (
            MLP(cfg, cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        cfg = self.cfg
        logits = torch.nn.functional.linear(x.float(), self.gate.weight.float())
        weights, ids = ops.moe_route(
            logits,
            self.gate.e_score_correction_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        y = ops.fused_moe(x, weights, ids, self.experts.weights())
        if self.shared_experts is not None:
            # Both are in x's dtype: torch adds bf16/fp16 in fp32 and rounds once, the same bits as
            # (y.float() + shared.float()).to(x.dtype) in one kernel instead of four.
            y = y + self.shared_experts(x, ops)
        return y
