"""The embedded default model: a tiny DeepSeek-V3.2-architecture checkpoint built deterministically.

It has the real format (sharded safetensors, FP8 e4m3 block-quantized weights with ``weight_scale_inv``, bf16
norms/embeddings/router/``weights_proj``/``eh_proj``, fp32 router bias and indexer ``k_norm``), an MTP layer with
its embedding and head copies, and the real DeepSeek-V3 tokenizer. ``index_topk`` is 32 so ordinary prompts take
the sparse attention path. The weights are random: it exercises every code path, it does not speak.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv.config import ModelConfig

VERSION = 1
SEED = 20251129
NUM_SHARDS = 2

DEFAULT_MODEL_CONFIG: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 129280,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 32,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    },
}

GENERATION_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 0.95,
}
MARKER = ".dsv-complete"


def default_cache_dir() -> Path:
    root = Path(os.environ.get("DSV_CACHE_DIR", Path.home() / ".cache" / "dsv"))
    return root / f"default-model-v{VERSION}"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The folder of the default model, built on first use (atomically: concurrent first uses are safe)."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_default_model(tmp)
        (tmp / MARKER).write_text(str(VERSION))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / MARKER).exists():  # a half-built folder from a crash: replace it
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of a checkpoint for ``cfg``, derived from the model itself."""
    from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, torch.bfloat16)
    shapes = {}
    for name, t in model.checkpoint_targets().items():
        if t is None:  # the MTP layer's copies of the embedding and the lm_head
            t = (
                model.lm_head.weight
                if name.endswith("shared_head.head.weight")
                else model.model.embed_tokens.weight
            )
        shapes[name] = (tuple(t.shape), t.dtype)
    return shapes


def _random_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from dsv.ops.quant import weight_quant

    gen = torch.Generator().manual_seed(SEED)
    specs = checkpoint_tensors(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in sorted(specs.items()):
        if name.endswith("weight_scale_inv"):
            continue
        if dtype == torch.float8_e4m3fn:
            std = 1.0 / shape[-1] ** 0.5  # keeps activations O(1) through the projections
            q, s = weight_quant(torch.randn(shape, generator=gen) * std, cfg.quant.block_size)
            out[name], out[name + "_scale_inv"] = q, s
        elif name.endswith(("norm.weight", "layernorm.weight", "enorm.weight", "hnorm.weight")):
            out[name] = torch.ones(shape, dtype=dtype)
        elif len(shape) == 1:  # router bias, k_norm bias
            out[name] = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)
    # The MTP layer's copies are copies, as in the real checkpoint.
    n = cfg.num_hidden_layers
    out[f"model.layers.{n}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    out[f"model.layers.{n}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def build_default_model(folder: Path) -> None:
    """Write config, tokenizer and a two-shard FP8 checkpoint into ``folder``."""
    from dsv.tokenizer import packaged_tokenizer_path

    cfg = ModelConfig.from_dict(DEFAULT_MODEL_CONFIG)
    tensors = _random_tensors(cfg)
    names = sorted(tensors)
    weight_map = {}
    for i in range(NUM_SHARDS):
        shard = f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::NUM_SHARDS]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(DEFAULT_MODEL_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    shutil.copyfile(packaged_tokenizer_path(), folder / "tokenizer.json")
    tok_cfg = packaged_tokenizer_path().with_name("tokenizer_config.json")
    if tok_cfg.exists():
        shutil.copyfile(tok_cfg, folder / "tokenizer_config.json")
