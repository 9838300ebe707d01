"""Multi-head latent attention with DeepSeek Sparse Attention (the lightning indexer picks the keys)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv.backend.interface import OpTable
from dsv.config import ModelConfig
from dsv.model.layers import Linear, RMSNorm
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.metadata import AttentionMetadata, positions_to_slots, used_slots
from dsv.ops.norm import hadamard_rotate, layer_norm
from dsv.ops.quant import act_quant
from dsv.ops.rope import apply_rope_interleaved, apply_rope_neox


@dataclass
class LayerCache:
    """The two caches of one decoder layer."""

    mla: MLACacheLayer
    index: IndexKCacheLayer


@dataclass
class RopeTables:
    """cos/sin [T, rope_dim/2] of this step's token positions (shared by all layers)."""

    cos: torch.Tensor
    sin: torch.Tensor


class Indexer(nn.Module):
    """The lightning indexer: scores every visible key with a few ReLU heads and keeps the top-k."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        fp8 = cfg.quant is not None
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, fp8, cfg, dtype)
        self.wk = Linear(cfg.hidden_size, self.head_dim, fp8, cfg, dtype)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, dtype=torch.float32)
        self.k_norm.requires_grad_(False)
        # weights_proj is stored unquantized in the checkpoint and applied in fp32.
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, False, cfg, dtype)

    def keys(self, x: torch.Tensor, rope: RopeTables, ops: OpTable) -> torch.Tensor:
        """Rotated keys [T, D]: LayerNorm(wk x), half-split RoPE on the first rope_dim dims, Hadamard."""
        k = layer_norm(self.wk(x, ops), self.k_norm.weight, self.k_norm.bias, self.k_norm.eps)
        k_pe = apply_rope_neox(k[:, None, : self.rope_dim], rope.cos, rope.sin)[:, 0]
        return hadamard_rotate(torch.cat([k_pe, k[:, self.rope_dim :]], dim=-1))

    def forward(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        rope: RopeTables,
        meta: AttentionMetadata,
        cache: IndexKCacheLayer,
        ops: OpTable,
        score: bool = True,
    ) -> torch.Tensor | None:
        """Write this step's keys; when ``score``, return top-k positions [T, topk] (int32, -1 padded)."""
        ops.index_k_write(cache, meta.slot_mapping, self.keys(x, rope, ops))
        if not score:
            return None
        t = x.shape[0]
        q = self.wq_b(qr, ops).view(t, self.n_heads, self.head_dim)
        q_pe = apply_rope_neox(q[..., : self.rope_dim], rope.cos, rope.sin)
        q = hadamard_rotate(torch.cat([q_pe, q[..., self.rope_dim :]], dim=-1))
        weights = torch.nn.functional.linear(x.float(), self.weights_proj.weight.float())
        weights = weights * (self.n_heads**-0.5 * self.head_dim**-0.5)
        if cache.quantized:
            # One power-of-two scale per (token, head), folded into the head weights as DeepGEMM expects.
            q, q_scale = act_quant(q, self.head_dim, "ue8m0")
            weights = weights * q_scale[..., 0]
        op = ops.indexer_topk_decode if meta.is_decode else ops.indexer_topk_prefill
        return op(q, weights, cache, meta, self.topk)


class MLA(nn.Module):
    """DeepSeek-V3.2 attention: low-rank q, a shared 512+64 latent KV, and index-selected sparse keys."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        fp8 = cfg.quant is not None
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, fp8, cfg, dtype)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
        self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, fp8, cfg, dtype)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.rank + self.rope_dim, fp8, cfg, dtype)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(self.rank, self.n_heads * (self.nope + self.v_dim), fp8, cfg, dtype)
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size, fp8, cfg, dtype)
        self.indexer = Indexer(cfg, dtype)
        self._absorbed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, R], W_UV [H, v, R]) from kv_b_proj, dequantized once and kept.

        The copy is keyed by dtype, storage and version of the weight, so reloading weights or moving the
        model to another device recomputes it.
        """
        if torch.compiler.is_compiling() and self._absorbed is not None:
            # Made before compiling (dsv.engine.compiled_decode); the key below reads data_ptr, which
            # torch.compile cannot trace.
            return self._absorbed[1], self._absorbed[2]
        weight = self.kv_b_proj.weight
        key = (dtype, weight.device, weight.data_ptr(), weight._version)
        if self._absorbed is None or self._absorbed[0] != key:
            w = self.kv_b_proj.dequantized(dtype).view(self.n_heads, self.nope + self.v_dim, self.rank)
            self._absorbed = (key, w[:, : self.nope].contiguous(), w[:, self.nope :].contiguous())
        return self._absorbed[1], self._absorbed[2]

    def forward(
        self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata, cache: LayerCache, ops: OpTable
    ) -> torch.Tensor:
        t = x.shape[0]
        qr = self.q_a_layernorm(self.q_a_proj(x, ops), ops)
        q = self.q_b_proj(qr, ops).view(t, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q[..., : self.nope], apply_rope_interleaved(q[..., self.nope :], rope.cos, rope.sin)
        kv = self.kv_a_proj_with_mqa(x, ops)
        latent = self.kv_a_layernorm(kv[:, : self.rank], ops)
        k_pe = apply_rope_interleaved(kv[:, None, self.rank :], rope.cos, rope.sin)[:, 0]
        ops.kv_write(cache.mla, meta.slot_mapping, latent, k_pe)

        # Sequences that fit in index_topk attend to every key: the indexer's choice is then "all of them".
        dense = meta.max_seq_len <= self.cfg.index_topk
        positions = self.indexer(x, qr, rope, meta, cache.index, ops, score=not dense or meta.is_decode)
        if dense and not meta.is_decode:
            out = self._dense_prefill(q_nope, q_pe, meta, cache.mla, ops)
        else:
            out = self._absorbed_sparse(q_nope, q_pe, positions, meta, cache.mla, ops)
        return self.o_proj(out.reshape(t, self.n_heads * self.v_dim), ops)

    def _dense_prefill(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        meta: AttentionMetadata,
        cache: MLACacheLayer,
        ops: OpTable,
    ) -> torch.Tensor:
        """Per-head ("MHA") form: expand every cached latent of the batch's sequences through kv_b_proj."""
        seq_lens = meta.seq_lens.tolist()
        rows = cache.read_rows(used_slots(meta)).to(q_nope.dtype)
        kv = self.kv_b_proj(rows[:, : self.rank], ops).view(-1, self.n_heads, self.nope + self.v_dim)
        k_pe = rows[:, None, self.rank :].expand(-1, self.n_heads, -1)
        k = torch.cat([kv[..., : self.nope], k_pe], dim=-1)
        v = kv[..., self.nope :]
        q = torch.cat([q_nope, q_pe], dim=-1)
        cu_k = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
        cu_k[1:] = torch.tensor(seq_lens).cumsum(0)
        return ops.mha_prefill(q, k, v, meta.query_start_loc, cu_k, self.scale)

    def _absorbed_sparse(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cache: MLACacheLayer,
        ops: OpTable,
    ) -> torch.Tensor:
        """Latent ("MQA") form over the top-k slots: q̃ = q_nope·W_UK, o = softmax(q̃·c + q_pe·k_pe)·c·W_UVᵀ."""
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        q_abs = torch.cat([q_lat, q_pe], dim=-1)
        rows = torch.arange(q_nope.shape[0], device=q_nope.device)
        slots = positions_to_slots(meta, positions, rows)
        op = ops.sparse_mla_decode if meta.is_decode else ops.sparse_mla_prefill
        out_lat = op(q_abs, cache, slots, self.scale)
        return torch.einsum("thr,hvr->thv", out_lat, w_uv)
