"""Extrapolation of the slice's figures to the full 61-layer model on 8 GPUs (docs/h200-slice.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv.config import ModelConfig

from .config import GB


@dataclass(frozen=True)
class Deployment:
    """The full model served with attention data-parallel and the MoE expert-parallel over ``ep`` GPUs.

    Attributes:
        layers, dense_layers: 61 and 3 for V3.2 (the MTP layer is not counted: no speculative decoding).
        ep: GPUs; each holds every attention and dense-MLP weight, 1/ep of the routed experts, the shared expert.
        a2a_gbps: effective per-GPU, per-direction all-to-all bandwidth (NVLink 4: 450 GB/s peak).
        a2a_latency_us: fixed cost of one dispatch or one combine (launch + synchronization).
        hbm_gb: usable device memory (an H200 reports ~150 GB); reserve_gb: activations, CUDA graphs, NCCL and
            dispatch buffers.
    """

    layers: int = 61
    dense_layers: int = 3
    ep: int = 8
    a2a_gbps: float = 300.0
    a2a_latency_us: float = 20.0
    hbm_gb: float = 150.0
    reserve_gb: float = 8.0
    vocab: int = 129280


def a2a_ms(cfg: ModelConfig, dep: Deployment, batch: int) -> float:
    """Dispatch + combine time of one MoE layer for ``batch`` tokens per GPU.

    Each token goes once to every GPU holding one of its experts: with n_group == ep the expert groups are the
    GPUs and a token reaches at most topk_group of them (4 for V3.2), (ep-1)/ep of which are remote. Dispatch
    sends FP8 hidden states with their 1x128 scales, combine returns bf16.
    """
    d = cfg.hidden_size
    gpus = min(cfg.topk_group, dep.ep) if cfg.n_group == dep.ep else min(cfg.num_experts_per_tok, dep.ep)
    remote = gpus * (dep.ep - 1) / dep.ep
    per_token = d + d // 128 * 4 + 2 * d
    return 2 * dep.a2a_latency_us / 1e3 + batch * remote * per_token / (dep.a2a_gbps * 1e9) * 1e3


def full_model_bytes(cfg: ModelConfig, weights: dict[str, int], dep: Deployment) -> dict[str, float]:
    """Per-GPU weight bytes of the full model under ``dep`` and the memory left for KV."""
    moe_layers = dep.layers - dep.dense_layers
    per_gpu = (
        dep.layers * weights["attention_per_layer"]
        + dep.dense_layers * weights.get("dense_mlp_per_layer", 0)
        + moe_layers
        * (
            weights.get("moe_routed_per_layer", 0) / dep.ep
            + weights.get("moe_shared_per_layer", 0)
            + weights.get("moe_router_per_layer", 0)
        )
        + 2 * dep.vocab * cfg.hidden_size * 2  # bf16 embedding + lm_head
    )
    return {"weights_per_gpu": per_gpu, "kv_room_per_gpu": dep.hbm_gb * GB - per_gpu - dep.reserve_gb * GB}


def _key(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv_dtype": r["kv_dtype"],
        "batch_per_gpu": r["batch"],
        "context": r["context"],
        "mode": r["mode"],
    }


def extrapolate(cfg: ModelConfig, results: dict[str, Any], dep: Deployment, key: str) -> list[dict[str, Any]]:
    """Step time of the full model per GPU from the slice's blocks:

    T = layers * attn(B, C) + dense_layers * dense_mlp(B) + moe_layers * (moe_ep_shard(B) + a2a(B)) + lm_head(B)

    with B sequences per GPU; throughput = ep * B / T. ``fits`` says whether B x C tokens of KV fit per GPU.
    """
    mem = full_model_bytes(cfg, results["weights_bytes"], dep)
    mlp = {r["batch"]: r for r in results.get("mlp", [])}
    moe_layers = dep.layers - dep.dense_layers
    out = []
    for r in results["cases"]:
        m = mlp.get(r["batch"])
        if "skip" in r or m is None:
            continue
        # One timing kind throughout (graph replays when measured): a failed capture leaves the row out, with why.
        named = {
            "attn": r["attn_ms"],
            "dense_mlp": m.get("dense_mlp_ms", {}),  # absent when the slice has no dense / MoE layer
            "moe_ep_shard": m.get("moe_ep_shard_ms", {}),
            "lm_head": m["lm_head_ms"],
        }
        missing = [n for n, v in named.items() if not isinstance(v.get(key), float)]
        if missing:
            out.append({**_key(r), "error": f"no {key} time for {', '.join(missing)}"})
            continue
        attn, dense, shard, head = (v[key] for v in named.values())
        comm = a2a_ms(cfg, dep, r["batch"])
        step = dep.layers * attn + dep.dense_layers * dense + moe_layers * (shard + comm) + head
        kv_need = (
            r["batch"] * r["context"] * dep.layers * results["kv"][r["kv_dtype"]]["bytes_per_token_layer"]
        )
        out.append(
            {
                **_key(r),
                "step_ms": round(step, 3),
                "attn_share": round(dep.layers * attn / step, 3),
                "a2a_ms_per_layer": round(comm, 4),
                "tok_s_total": round(dep.ep * r["batch"] / step * 1e3, 1),
                "tok_s_per_seq": round(1e3 / step, 1),
                "kv_gb_per_gpu": round(kv_need / GB, 1),
                "fits": kv_need <= mem["kv_room_per_gpu"],
            }
        )
    return out
