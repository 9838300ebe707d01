"""The timed blocks outside the full step: attention block, MLP blocks, one expert-parallel MoE shard, lm_head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dsv.backend.interface import OpTable
from dsv.model.attention import LayerCache
from dsv.model.deepseek_v32 import DecoderLayer, DeepseekV32ForCausalLM
from dsv.model.moe import MoE
from dsv.ops.metadata import AttentionMetadata
from dsv.ops.moe import ExpertWeights

from .settings import Settings
from .timing import free_memory
from .weights import randn


def attn_block(layer: DecoderLayer) -> Callable[..., torch.Tensor]:
    """h + self_attn(input_layernorm(h)): the first half of DecoderLayer.forward."""

    def fn(
        h: torch.Tensor, rope: Any, meta: AttentionMetadata, cache: LayerCache, ops: OpTable
    ) -> torch.Tensor:
        return h + layer.self_attn(layer.input_layernorm(h, ops), rope, meta, cache, ops)

    return fn


def mlp_block(layer: DecoderLayer, h: torch.Tensor, ops: OpTable) -> torch.Tensor:
    """h + mlp(post_attention_layernorm(h)): the second half of DecoderLayer.forward."""
    return h + layer.mlp(layer.post_attention_layernorm(h, ops), ops)


def ep_shard_block(
    layer: DecoderLayer, ep: int, batch: int, gen: torch.Generator
) -> Callable[[torch.Tensor, OpTable], tuple[torch.Tensor, torch.Tensor | None]]:
    """One GPU's MoE work under expert parallelism over ``ep`` GPUs with ``batch`` tokens per GPU (communication
    excluded): router + routing of its own tokens, the shared expert on them, and its E/ep experts on the
    ``top_k * batch`` rows routed to it from all GPUs (balanced routing, each row to one local expert)."""
    moe = layer.mlp
    assert isinstance(moe, MoE)
    cfg = moe.cfg
    n_local = max(1, cfg.n_routed_experts // ep)
    e = moe.experts
    local = ExpertWeights(
        e.w1[:n_local],
        e.w3[:n_local],
        e.w2[:n_local],
        None if e.w1_scale is None else e.w1_scale[:n_local],
        None if e.w3_scale is None else e.w3_scale[:n_local],
        None if e.w2_scale is None else e.w2_scale[:n_local],
        e.block,
        e.act_scale_fmt,
    )
    device = e.w1.device
    rows = cfg.num_experts_per_tok * batch
    received = randn((rows, cfg.hidden_size), gen, device)
    ids = torch.randint(0, n_local, (rows, 1), generator=gen, device=device)
    route_w = torch.ones(rows, 1, device=device)

    def fn(h: torch.Tensor, ops: OpTable) -> torch.Tensor:
        x = layer.post_attention_layernorm(h, ops)
        logits = torch.nn.functional.linear(x.float(), moe.gate.weight.float())
        ops.moe_route(
            logits,
            moe.gate.e_score_correction_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        y = ops.fused_moe(received, route_w, ids, local)
        shared = moe.shared_experts(x, ops) if moe.shared_experts is not None else None
        return y, shared

    return fn


@torch.inference_mode()
def per_batch_blocks(model: DeepseekV32ForCausalLM, s: Settings, ops: OpTable) -> list[dict[str, Any]]:
    """MLP-side blocks, which depend on the batch only: dense MLP, MoE on one GPU, one EP shard, lm_head."""
    cfg = model.cfg
    layers = list(model.model.layers)
    dense = next((x for x in layers if not isinstance(x.mlp, MoE)), None)
    moe = next((x for x in layers if isinstance(x.mlp, MoE)), None)
    gen = torch.Generator(device=s.device).manual_seed(s.seed + 1)
    head = randn((s.head_vocab, cfg.hidden_size), gen, s.device).mul_(cfg.hidden_size**-0.5)
    out = []
    for b in s.batches:
        h = randn((b, cfg.hidden_size), gen, s.device)
        row: dict[str, Any] = {"batch": b}
        if dense is not None:
            row["dense_mlp_ms"] = s.timer.measure(lambda dense=dense, h=h: mlp_block(dense, h, ops))
        if moe is not None:
            row["moe_mlp_ms"] = s.timer.measure(lambda moe=moe, h=h: mlp_block(moe, h, ops))
            shard = ep_shard_block(moe, s.ep, b, gen)
            row["moe_ep_shard_ms"] = s.timer.measure(lambda shard=shard, h=h: shard(h, ops))
        # The engine's greedy path runs the head GEMM in bf16 (ModelRunner.greedy_tokens).
        row["lm_head_ms"] = s.timer.measure(lambda h=h: torch.nn.functional.linear(h, head))
        out.append(row)
        free_memory(s.device)
    return out
