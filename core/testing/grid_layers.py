"""Layer cases: a DeepSeek-V3.2 decoder layer (dense MLP and MoE) and the MTP layer, driven through a
sequence of batches that takes every attention path: dense short prefill, sparse ragged prefill, a chunk on a
cached prefix, decode, and a three-token speculative verify."""

from __future__ import annotations

from typing import Any

import torch

from dsv.engine.batch import SeqChunk, build_metadata
from dsv.model.attention import LayerCache, RopeTables
from dsv.model.deepseek_v32 import DecoderLayer, MTPLayer
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.rope import rope_cos_sin, rope_inv_freq
from dsv.testing.case import Case, Inputs, Needs
from dsv.testing.checks import Close
from dsv.testing.tiny import fill_module, tiny_config

#: Steps over three sequences A, B, C: {sequence: (cached prefix, new tokens)}. index_topk is 128.
STEPS: list[dict[int, tuple[int, int]]] = [
    {2: (0, 40)},  # C alone fits in index_topk: the dense (MHA) prefill path
    {0: (0, 150), 1: (0, 30)},  # sparse prefill, ragged, B with fewer keys than top-k
    {0: (150, 20), 2: (40, 10)},  # chunks on cached prefixes
    {0: (170, 1), 1: (30, 1), 2: (50, 1)},  # decode
    {0: (171, 3), 1: (31, 3)},  # speculative verify: three query tokens per sequence
]

LAYER_WHY = (
    "bf16 activations through ~10 dependent ops, each FP8 GEMM re-quantizing its input to e4m3: any bf16 "
    "rounding difference flips some e4m3 roundings by 2^-3 (~2^-6 relative per GEMM); the reference ops on an "
    "H200 differ from the same ops on the CPU by up to 0.32 of this tolerance"
)
LAYER_TOL = Close(rtol=2.0**-3, atol=2.0**-3, why=LAYER_WHY)


def _final_lengths() -> list[int]:
    ends: dict[int, int] = {}
    for step in STEPS:
        for seq, (start, n) in step.items():
            ends[seq] = max(ends.get(seq, 0), start + n)
    return [ends[s] for s in sorted(ends)]


def _build(kind: str, layout: str, page: int):
    def build(inp: Inputs) -> dict[str, Any]:
        cfg = tiny_config()
        dtype = inp.dtype(torch.bfloat16)
        if kind == "mtp":
            layer = MTPLayer(cfg, cfg.num_hidden_layers, dtype)
        else:
            layer = DecoderLayer(cfg, 0 if kind == "dense" else cfg.first_k_dense_replace, dtype)
        layer = fill_module(layer, seed={"dense": 1, "moe": 2, "mtp": 3}[kind]).to(inp.device)
        pages, num_pages = inp.pages(_final_lengths(), page)
        cache = LayerCache(
            MLACacheLayer(num_pages, page, cfg.kv_lora_rank, cfg.qk_rope_head_dim, layout, dtype, inp.device),
            IndexKCacheLayer(num_pages, page, cfg.index_head_dim, True, dtype, inp.device),
        )
        inv_freq = rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim)
        steps = []
        for step in STEPS:
            meta = build_metadata(
                [SeqChunk(s, n, pages[seq]) for seq, (s, n) in step.items()], page, inp.device
            )
            cos, sin = rope_cos_sin(inv_freq.to(inp.device), meta.positions)
            x = inp.randn(meta.num_tokens, cfg.hidden_size)
            extra = inp.randn(meta.num_tokens, cfg.hidden_size) if kind == "mtp" else None
            steps.append((meta, RopeTables(cos, sin), x, extra))
        return {"layer": layer, "cache": cache, "steps": steps}

    return build


def _call(ops: Any, a: dict[str, Any]) -> torch.Tensor:
    layer, cache, outs = a["layer"], a["cache"], []
    for meta, rope, x, extra in a["steps"]:
        if isinstance(layer, MTPLayer):
            outs.append(layer.forward_mtp(x, extra, rope, meta, cache, ops))
        else:
            outs.append(layer(x, rope, meta, cache, ops))
    return torch.cat(outs)


def layer_cases() -> list[Case]:
    cases = []
    for kind, layout, page, quick in [
        ("dense", "float", 64, True),
        ("moe", "float", 64, True),
        ("moe", "fp8", 1, False),
        ("dense", "fp8", 64, False),
        ("mtp", "float", 64, True),
        ("mtp", "fp8", 64, False),
    ]:
        rid = f"{'fp8' if layout == 'fp8' else 'bf16'}-kv/page{page}"
        op = {"dense": "decoder_layer_dense", "moe": "decoder_layer_moe", "mtp": "mtp_layer"}[kind]
        cases.append(
            Case(
                "layers",
                op,
                rid,
                _build(kind, layout, page),
                _call,
                LAYER_TOL,
                Needs(kv_layout=layout, page_size=page),
                quick=quick,
                seed=600 + len(cases),
                replay=True,
            )
        )
    return cases
