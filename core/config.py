"""Model configuration parsed from a Hugging Face ``config.json``.

Two forms are met in practice and both are accepted:

* the original DeepSeek form (``rope_scaling``, ``torch_dtype``, ``quantization_config`` with
  ``weight_block_size`` and ``scale_fmt``), as shipped with ``deepseek-ai/DeepSeek-V3.2-Exp``;
* the form transformers 5 writes (``rope_parameters``, ``dtype``, ``layer_types``, ``mlp_layer_types``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v32",)


#: DeepSeek-V3.2's ``quantization_config``: e4m3 weights in 128x128 blocks, activations quantized per 1x128
#: group at run time with power-of-two (ue8m0) scales. Copy it before changing it.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "scale_fmt": "ue8m0",
}


def yarn_rope_scaling(factor: float, original_max_position_embeddings: int) -> dict[str, Any]:
    """A V3.2-style YaRN ``rope_scaling`` entry (beta 32/1, mscale 1) for a config dict."""
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original_max_position_embeddings,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


#: ``config.json`` of ``deepseek-ai/DeepSeek-V3.2-Exp`` as published (the original DeepSeek form): the real
#: dimensions, for full-width benchmarks and tests. Copy it before changing it.
DEEPSEEK_V32_EXP_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": yarn_rope_scaling(40, 4096),
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "quantization_config": dict(FP8_QUANTIZATION_CONFIG),
}


class ConfigError(ValueError):
    """A config.json that dsv cannot serve, with the reason."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters shared by MLA and the indexer (YaRN when ``rope_type == "yarn"``)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Block-FP8 weight quantization as in DeepSeek checkpoints (``weight_scale_inv`` multiplied in dequant)."""

    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # "ue8m0": activation scales rounded up to a power of two
    fmt: str = "e4m3"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the DeepSeek-V3.2 model needs, independent of the config.json form it came from."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    num_nextn_predict_layers: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    quant: QuantConfig | None
    dtype: str = "bfloat16"
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False
    scoring_func: str = "sigmoid"
    model_type: str = "deepseek_v32"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----- derived quantities -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached MLA token: latent + shared RoPE key (576 for the full model)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale² when YaRN sets ``mscale_all_dim`` (0.1352338 for V3.2)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim and self.rope.factor > 1:
            m = 0.1 * self.rope.mscale_all_dim * math.log(self.rope.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    # ----- parsing -----
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported by dsv; it serves {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(DeepSeek-V3.2 / V3.2-Exp checkpoints)"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in cfg:
                raise ConfigError(f"config.json lacks the required key {key!r}")
        n_layers = int(cfg["num_hidden_layers"])
        first_dense = _first_dense(cfg, n_layers)
        eos = cfg.get("eos_token_id", 1)
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg.get("intermediate_size", 18432)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", 2048)),
            num_hidden_layers=n_layers,
            num_attention_heads=int(cfg["num_attention_heads"]),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0) or _missing("q_lora_rank"),
            kv_lora_rank=int(cfg.get("kv_lora_rank", 512)),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim", 128)),
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim", 64)),
            v_head_dim=int(cfg.get("v_head_dim", 128)),
            n_routed_experts=int(cfg.get("n_routed_experts", 256)),
            n_shared_experts=int(cfg.get("n_shared_experts", 1)),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
            n_group=int(cfg.get("n_group", 1)),
            topk_group=int(cfg.get("topk_group", 1)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            first_k_dense_replace=first_dense,
            index_n_heads=int(cfg.get("index_n_heads", 64)),
            index_head_dim=int(cfg.get("index_head_dim", 128)),
            index_topk=int(cfg.get("index_topk", 2048)),
            num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers", 0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 163840)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(cfg),
            quant=_parse_quant(cfg.get("quantization_config")),
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            bos_token_id=int(cfg.get("bos_token_id", 0) or 0),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            scoring_func=str(cfg.get("scoring_func", "sigmoid")),
            model_type=model_type,
            raw=dict(cfg),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no config.json at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        cfg = cls.from_dict(data)
        if cfg.scoring_func != "sigmoid":
            raise ConfigError(f"{path}: scoring_func {cfg.scoring_func!r} is not supported (only 'sigmoid')")
        return cfg


def _missing(key: str) -> int:
    raise ConfigError(f"config.json lacks {key!r}; DeepSeek-V3.2 always uses a low-rank query projection")


def _first_dense(cfg: dict[str, Any], n_layers: int) -> int:
    """Number of leading dense layers, from ``first_k_dense_replace`` or transformers 5's ``mlp_layer_types``."""
    kinds = cfg.get("mlp_layer_types")
    if kinds:
        if len(kinds) != n_layers:
            raise ConfigError(f"mlp_layer_types has {len(kinds)} entries for {n_layers} layers")
        dense = [k == "dense" for k in kinds]
        n_dense = dense.index(False) if False in dense else n_layers
        if any(dense[n_dense:]):
            raise ConfigError(
                "mlp_layer_types mixes dense layers after MoE layers; DeepSeek-V3.2 has them first"
            )
        return n_dense
    return int(cfg.get("first_k_dense_replace", 0))


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        mscale=float(params.get("mscale", 1.0)),
        mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
    )


def _parse_quant(q: dict[str, Any] | None) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization method {method!r} is not supported (only block 'fp8')")
    fmt = str(q.get("fmt", "e4m3"))
    if fmt != "e4m3":
        raise ConfigError(f"FP8 format {fmt!r} is not supported (DeepSeek-V3.2 checkpoints use 'e4m3')")
    block = tuple(int(b) for b in q.get("weight_block_size", (128, 128)))
    if len(block) != 2:
        raise ConfigError(f"weight_block_size must have two entries, got {block}")
    return QuantConfig(block_size=block, scale_fmt=q.get("scale_fmt"), fmt=fmt)
