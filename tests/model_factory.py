"""Tiny random DeepSeek-V3.2 models built in memory for tests (no checkpoint on disk)."""

from __future__ import annotations

from typing import Any

import torch

from dsv.config import FP8_QUANTIZATION_CONFIG, ModelConfig, yarn_rope_scaling
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM
from dsv.ops.quant import weight_quant

TINY_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v32",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    # 8 index heads: with very few heads many keys score exactly 0 after ReLU and top-k ties become common.
    "index_n_heads": 8,
    "index_head_dim": 16,
    "index_topk": 8,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 256,
    "rope_scaling": yarn_rope_scaling(4.0, 64),
}

FP8_QUANT = dict(FP8_QUANTIZATION_CONFIG)


def tiny_config(fp8: bool = False, **overrides: Any) -> ModelConfig:
    cfg = dict(TINY_CONFIG, **overrides)
    if fp8:
        cfg["quantization_config"] = FP8_QUANT
    return ModelConfig.from_dict(cfg)


def random_tiny_model(
    cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.1
) -> DeepseekV32ForCausalLM:
    """A model with seeded random weights; FP8 weights are quantized from random float ones."""
    cfg = cfg or tiny_config()
    model = DeepseekV32ForCausalLM(cfg, dtype)
    gen = torch.Generator().manual_seed(seed)
    targets = model.checkpoint_targets()
    with torch.no_grad():
        for name, t in sorted(targets.items()):
            if t is None or name.endswith("weight_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                q, s = weight_quant(torch.randn(t.shape, generator=gen) * std, cfg.quant.block_size)
                t.copy_(q)
                targets[name + "_scale_inv"].copy_(s)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) * std)
            elif "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
    return model.eval()
