"""The slice model built on the device with random block-FP8 weights, and its weight bytes per kind."""

from __future__ import annotations

import dataclasses
import math

import torch

from dsv.config import ModelConfig
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM
from dsv.model.moe import MoE

from .config import CHUNK, FP8_CODE_STD


def randn(shape: tuple[int, ...] | int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """bf16 N(0, 1) values from ``gen`` (every random weight, cache row and input goes through here)."""
    return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)


def _fill_fp8(t: torch.Tensor, gen: torch.Generator) -> None:
    """Random e4m3 codes of std FP8_CODE_STD, generated CHUNK elements at a time on ``t``'s device."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        end = min(start + CHUNK, flat.numel())
        flat[start:end] = randn(end - start, gen, t.device).mul_(FP8_CODE_STD).to(t.dtype)


def _pow2(x: float) -> float:
    # Power-of-two block scales, as ue8m0 checkpoints have them.
    return 2.0 ** round(math.log2(x))


@torch.no_grad()
def fill_random_weights(model: DeepseekV32ForCausalLM, seed: int) -> None:
    """Random weights in place, every parameter: FP8 codes with block scales giving N(0, 1/fan_in) weights,
    float matrices N(0, 1/fan_in) (the embedding N(0, 1)), norm weights 1, biases 0."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    done: set[str] = set()
    for name, p in params.items():
        if p.dtype == torch.float8_e4m3fn:
            _fill_fp8(p, gen)
            # Linear: x.weight -> x.weight_scale_inv; stacked experts: experts.w1 -> experts.w1_scale.
            scale_name = name + "_scale_inv" if name.endswith(".weight") else name + "_scale"
            params[scale_name].fill_(_pow2(p.shape[-1] ** -0.5 / FP8_CODE_STD))
            done |= {name, scale_name}
    for name, p in params.items():
        if name in done:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("bias", "e_score_correction_bias")):
            p.zero_()
        elif p.dim() == 2:
            std = 1.0 if name.endswith("embed_tokens.weight") else p.shape[1] ** -0.5
            for start in range(0, p.shape[0], max(1, CHUNK // p.shape[1])):
                rows = p[start : start + max(1, CHUNK // p.shape[1])]
                rows.copy_(randn(tuple(rows.shape), gen, device).mul_(std))
        else:
            raise RuntimeError(f"no random fill rule for parameter {name} {tuple(p.shape)} {p.dtype}")


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> DeepseekV32ForCausalLM:
    """The model allocated directly on ``device`` (no host copy of the weights) with random weights."""
    with torch.device(device):
        model = DeepseekV32ForCausalLM(cfg, torch.bfloat16)
    fill_random_weights(model, seed)
    return model.eval()


def set_index_topk(model: DeepseekV32ForCausalLM, k: int) -> None:
    """Switch every layer to ``index_topk = k`` (the weights do not depend on it; rebuilding tens of GB of
    weights per mode would take longer than the timing)."""
    cfg = dataclasses.replace(model.cfg, index_topk=k)
    model.cfg = cfg
    for layer in model.model.layers:
        layer.self_attn.cfg = cfg
        layer.self_attn.indexer.topk = k


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_bytes(model: DeepseekV32ForCausalLM) -> dict[str, int]:
    """Bytes of each kind of weight per layer (what the 61-layer extrapolation scales)."""
    layers = list(model.model.layers)
    out = {"attention_per_layer": module_bytes(layers[0].self_attn)}
    dense = [x for x in layers if not isinstance(x.mlp, MoE)]
    moe = [x for x in layers if isinstance(x.mlp, MoE)]
    if dense:
        out["dense_mlp_per_layer"] = module_bytes(dense[0].mlp)
    if moe:
        m = moe[0].mlp
        out["moe_routed_per_layer"] = module_bytes(m.experts)
        out["moe_shared_per_layer"] = module_bytes(m.shared_experts) if m.shared_experts is not None else 0
        out["moe_router_per_layer"] = module_bytes(m.gate)
    out["total"] = module_bytes(model)
    return out
