"""A small DeepSeek-V3.2 configuration with the real attention dimensions, seeded weights, and a tiny
checkpoint on disk for the layers and model tiers.

Attention keeps V3.2's shapes (16 heads as on one of 8 tensor-parallel ranks, 512 + 64 latent, 128-dim nope/v,
indexer 64 x 128) because vendor kernels are specialized for them; everything else is shrunk so the CPU
reference runs in seconds. Weights are FP8 block-quantized as in the released checkpoints.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv.config import FP8_QUANTIZATION_CONFIG, ModelConfig, yarn_rope_scaling
from dsv.ops.quant import weight_quant

TINY_V32: dict[str, Any] = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "q_lora_rank": 256,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 128,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": yarn_rope_scaling(40, 4096),
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": dict(FP8_QUANTIZATION_CONFIG),
}


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict(TINY_V32)


def random_weights(
    named: dict[str, torch.Tensor | None], seed: int, head_std: float = 1.0, residual_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Seeded checkpoint tensors for the targets ``named`` (checkpoint name -> tensor it fills).

    FP8 weights are quantized from N(0, 1/in) so activations stay O(1); float matrices are rounded to bf16 as
    in a checkpoint; norms are 1; vectors (router bias, k_norm bias) are small. ``head_std`` scales the
    lm_head so greedy choices have clear margins; ``residual_scale`` scales the blocks' output projections.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(named.items()):
        if t is None or name.endswith("_scale_inv") or name.endswith("_scale"):
            continue
        shape = tuple(t.shape)
        if t.dtype == torch.float8_e4m3fn:
            w = torch.randn(shape, generator=gen) * _std(name, shape, head_std, residual_scale)
            if len(shape) == 3:  # stacked experts
                pairs = [weight_quant(w[i]) for i in range(shape[0])]
                q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            else:
                q, s = weight_quant(w)
            scale_name = name + "_scale_inv" if name + "_scale_inv" in named else name + "_scale"
            out[name], out[scale_name] = q, s
        elif "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1] and name.endswith("weight"):
            out[name] = torch.ones(shape, dtype=t.dtype)
        elif len(shape) == 1:
            out[name] = (torch.randn(shape, generator=gen) * 0.05).to(t.dtype)
        else:
            w = torch.randn(shape, generator=gen) * _std(name, shape, head_std, residual_scale)
            out[name] = w.to(torch.bfloat16).to(t.dtype)
    return out


def _std(name: str, shape: tuple[int, ...], head_std: float, residual_scale: float) -> float:
    if "embed_tokens" in name:
        return 1.0
    fan_in = shape[-1] ** -0.5
    if name == "lm_head.weight":
        return head_std * fan_in
    if any(part in name for part in ("o_proj.", "down_proj.", "experts.w2")):
        return residual_scale * fan_in
    return fan_in


def fill_module(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of ``module`` (named as in the module) with :func:`random_weights`."""
    params = dict(module.named_parameters())
    values = random_weights(params, seed)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
    return module.eval()


@functools.lru_cache(maxsize=1)
def tiny_checkpoint() -> Path:
    """A tiny FP8 checkpoint (config.json + one safetensors file) in a temporary folder, built once per process."""
    from safetensors.torch import save_file

    from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

    cfg = tiny_config()
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, torch.bfloat16)
    targets = model.checkpoint_targets()
    # As in a trained model, the residual stream is dominated by the embedding and each block adds a small
    # update: rounding differences (2^-6 per FP8 GEMM) then stay at their size instead of compounding from
    # layer to layer into ~20% of the logits, as they do when every block's output is as large as its input.
    tensors = random_weights(targets, seed=1234, head_std=4.0, residual_scale=0.25)
    n = cfg.num_hidden_layers  # the MTP layer's copies of the embedding and head, as in real checkpoints
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    folder = Path(tempfile.mkdtemp(prefix="dsv-conformance-"))
    atexit.register(shutil.rmtree, folder, True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_V32, indent=2))
    return folder
