"""KV memory plan of a case, random filling of the paged caches, and the decode step's metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv.config import ModelConfig
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.kv_pool import CacheSpec, KVPool
from dsv.model.attention import LayerCache
from dsv.ops.metadata import AttentionMetadata
from dsv.ops.quant import pack_fp8_kv

from .config import CHUNK, FP8_CODE_STD, GB
from .weights import randn


def kv_bytes_per_token_layer(cfg: ModelConfig, spec: CacheSpec) -> int:
    """MLA + indexer cache bytes of one token in one layer (1152 + 132 for bf16, 656 + 132 for FP8)."""
    return KVPool.bytes_per_token(cfg, spec, torch.bfloat16) // cfg.num_hidden_layers


def pages_per_seq(context: int, page_size: int) -> int:
    return -(-context // page_size)


def workspace_bytes(batch: int, context: int) -> int:
    """Activation / graph-pool memory of one decode step beyond the weights and caches, with margin: the
    indexer logits [B, C] fp32 and top-k buffers, the dense path's position and slot tensors [B, C] int64, the
    split-KV partials of sparse MLA, plus 2 GB for cuBLAS/Triton workspaces and the allocator."""
    return 16 * 8 * batch * context + batch * 32 * 128 * 512 * 4 + 2 * 10**9


@dataclass
class Plan:
    """Memory plan of one (kv dtype, batch, context) case."""

    kv_dtype: str
    batch: int
    context: int
    kv_per_token_layer: int
    kv_bytes_per_layer: int
    layers: int  # decoder layers of the slice
    cache_layers: int  # distinct layer caches: ``layers``, or 1 shared by every layer
    need_bytes: int  # caches + workspace
    skip: str | None = None

    @property
    def shared_kv(self) -> bool:
        return self.skip is None and self.cache_layers < self.layers


def plan_case(cfg: ModelConfig, spec: CacheSpec, batch: int, context: int, weights: int, budget: int) -> Plan:
    """Distinct caches per layer when they fit in ``budget - weights``, else one cache shared by every layer,
    else a skip with the reason."""
    per_tok = kv_bytes_per_token_layer(cfg, spec)
    pages = batch * pages_per_seq(context, spec.page_size) + 1
    per_layer = pages * spec.page_size * per_tok
    work = workspace_bytes(batch, context)
    room = budget - weights
    n = cfg.num_hidden_layers
    plan = Plan(spec.kv_cache_dtype, batch, context, per_tok, per_layer, n, n, n * per_layer + work)
    if plan.need_bytes <= room:
        return plan
    plan.cache_layers, plan.need_bytes = 1, per_layer + work
    if plan.need_bytes > room:
        plan.skip = (
            f"needs {per_layer / GB:.1f} GB of KV for one layer ({batch} x {context} tokens x {per_tok} B) + "
            f"{work / GB:.1f} GB workspace, {room / GB:.1f} GB left after {weights / GB:.1f} GB of weights"
        )
    return plan


@torch.no_grad()
def fill_random_cache(cache: LayerCache, gen: torch.Generator) -> None:
    """Random rows in every slot: latents ~ N(0, 1) (as after kv_a_layernorm), rope keys ~ N(0, 1), indexer keys
    as FP8 codes with power-of-two scales (or bf16 keys when unquantized)."""
    mla, index = cache.mla, cache.index
    device = mla.storage.device
    flat = mla.flat
    if mla.layout == "fp8":
        rows_per_chunk = max(1, CHUNK // flat.shape[1])
        for start in range(0, flat.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, flat.shape[0] - start)
            latent = randn((n, mla.kv_lora_rank), gen, device)
            flat[start : start + n] = pack_fp8_kv(latent, randn((n, mla.rope_dim), gen, device))
    else:
        rows_per_chunk = max(1, CHUNK // flat.shape[1])
        for start in range(0, flat.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, flat.shape[0] - start)
            flat[start : start + n] = randn((n, flat.shape[1]), gen, device).to(flat.dtype)
    if index.quantized:
        pages_per_chunk = max(1, CHUNK // (index.page_size * index.head_dim))
        for start in range(0, index.keys.shape[0], pages_per_chunk):
            keys = index.keys[start : start + pages_per_chunk]
            keys.copy_(randn(tuple(keys.shape), gen, device).mul_(FP8_CODE_STD).to(keys.dtype))
        index.scales.fill_(1.0 / FP8_CODE_STD)
    else:
        keys = index.storage.view(-1, index.head_dim)
        for start in range(0, keys.shape[0], max(1, CHUNK // index.head_dim)):
            chunk = keys[start : start + max(1, CHUNK // index.head_dim)]
            chunk.copy_(randn(tuple(chunk.shape), gen, device))


def decode_metadata(
    pool: KVPool, batch: int, context: int, device: torch.device, seed: int
) -> AttentionMetadata:
    """One decode token per sequence at position ``context - 1`` (so ``context`` keys, the new one included),
    each sequence owning ceil(context / page) pages drawn at random from the pool, as after real traffic."""
    per_seq = pages_per_seq(context, pool.page_size)
    pages = torch.tensor(pool.allocate(batch * per_seq))
    pages = pages[torch.randperm(pages.numel(), generator=torch.Generator().manual_seed(seed))]
    chunks = [SeqChunk(context - 1, 1, pages[b * per_seq : (b + 1) * per_seq].tolist()) for b in range(batch)]
    return build_metadata(chunks, pool.page_size, device)
