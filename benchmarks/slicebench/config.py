"""The model dimensions of the slice: V3.2's config (or tiny widths for the CPU check) with chosen layer counts."""

from __future__ import annotations

import copy
from typing import Any

from dsv.config import DEEPSEEK_V32_EXP_CONFIG, ModelConfig, yarn_rope_scaling

GB = 1e9
#: Every dimension of DeepSeek-V3.2(-Exp)'s config.json (shared/reference/deepseek-v32-model.md §1.1); the layer
#: counts and the vocabulary are set per run.
V32_CONFIG: dict[str, Any] = copy.deepcopy(DEEPSEEK_V32_EXP_CONFIG)
#: The CPU check: same structure, tiny widths (kv_lora_rank 128: the FP8 cache layout needs multiples of 128).
TINY_CONFIG: dict[str, Any] = dict(
    V32_CONFIG,
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    max_position_embeddings=4096,
    rope_scaling=yarn_rope_scaling(4, 1024),
)
#: Std of the random FP8 codes (the block scale maps them to N(0, 1/fan_in)); far from e4m3's 448 limit.
FP8_CODE_STD = 32.0
#: Elements generated per random chunk (bounds the temporary memory of the weight and cache fills).
CHUNK = 1 << 27


def slice_config(base: dict[str, Any], dense_layers: int, moe_layers: int, vocab: int) -> ModelConfig:
    """``base`` with ``dense_layers`` dense then ``moe_layers`` MoE decoder layers, no MTP layer."""
    if dense_layers < 0 or moe_layers < 0 or dense_layers + moe_layers < 1:
        raise ValueError(f"need at least one layer, got {dense_layers} dense + {moe_layers} MoE")
    cfg = dict(
        base,
        num_hidden_layers=dense_layers + moe_layers,
        first_k_dense_replace=dense_layers,
        num_nextn_predict_layers=0,
        vocab_size=vocab,
    )
    return ModelConfig.from_dict(cfg)
