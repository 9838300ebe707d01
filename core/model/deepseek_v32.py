"""DeepSeek-V3.2: decoder layers, the causal LM, and the multi-token-prediction (MTP) layer.

Every heavy operation goes through the :class:`~dsv.backend.interface.OpTable` passed to ``forward``; this
module only holds weights and wires the data flow. Parameter names match the Hugging Face checkpoint
(``model.layers.{i}.self_attn.q_a_proj.weight`` ...), so loading is a name lookup.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv.backend.interface import OpTable
from dsv.config import ModelConfig
from dsv.model.attention import MLA, LayerCache, RopeTables
from dsv.model.layers import MLP, Linear, RMSNorm
from dsv.model.moe import MoE
from dsv.ops.metadata import AttentionMetadata
from dsv.ops.rope import rope_cos_sin, rope_inv_freq


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoE(cfg, dtype)
            if cfg.is_moe_layer(layer_id)
            else MLP(cfg, cfg.hidden_size, cfg.intermediate_size, dtype)
        )

    def forward(
        self, h: torch.Tensor, rope: RopeTables, meta: AttentionMetadata, cache: LayerCache, ops: OpTable
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h, ops), rope, meta, cache, ops)
        return h + self.mlp(self.post_attention_layernorm(h, ops), ops)


class SharedHead(nn.Module):
    """The MTP layer's output norm; its ``head`` is the main lm_head (the checkpoint's copy is not loaded)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class MTPLayer(DecoderLayer):
    """``model.layers.{num_hidden_layers}``: predicts token t+2 from token t+1's embedding and h_t.

    z = eh_proj([enorm(emb(t+1)) ; hnorm(h_t)]), then a full DSA + MoE decoder layer, then shared_head.norm.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype):
        super().__init__(cfg, layer_id, dtype)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, False, cfg, dtype)  # bf16 in checkpoints
        self.shared_head = SharedHead(cfg, dtype)

    def forward_mtp(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        rope: RopeTables,
        meta: AttentionMetadata,
        cache: LayerCache,
        ops: OpTable,
    ) -> torch.Tensor:
        """Normalized draft hidden states [T, D] (feed them to the lm_head)."""
        z = self.eh_proj(torch.cat([self.enorm(embeds, ops), self.hnorm(hidden, ops)], dim=-1), ops)
        return self.shared_head.norm(super().forward(z, rope, meta, cache, ops), ops)


class DeepseekV32Model(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.requires_grad_(False)
        layers: list[nn.Module] = [DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
        layers += [
            MTPLayer(cfg, cfg.num_hidden_layers + i, dtype) for i in range(cfg.num_nextn_predict_layers)
        ]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class DeepseekV32ForCausalLM(nn.Module):
    """The full model. ``forward`` returns final (normed) hidden states; ``logits`` applies the lm_head."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.model = DeepseekV32Model(cfg, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.lm_head.requires_grad_(False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute non-checkpoint buffers (after ``to_empty``)."""
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.qk_rope_head_dim).to(self.inv_freq.device)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_hidden_layers

    @property
    def mtp(self) -> MTPLayer | None:
        return self.model.layers[self.cfg.num_hidden_layers] if self.cfg.has_mtp else None

    def rope_tables(self, positions: torch.Tensor) -> RopeTables:
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        return RopeTables(cos, sin)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, caches: list[LayerCache], ops: OpTable
    ) -> torch.Tensor:
        """Hidden states [T, D] after the final norm for the flattened batch ``input_ids`` [T]."""
        rope = self.rope_tables(meta.positions)
        h = self.model.embed_tokens(input_ids)
        for i in range(self.cfg.num_hidden_layers):
            h = self.model.layers[i](h, rope, meta, caches[i], ops)
        return self.model.norm(h, ops)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] (the head is applied in fp32, as DeepSeek's reference does)."""
        return torch.nn.functional.linear(hidden.float(), self.lm_head.weight.float())

    def forward_mtp(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        cache: LayerCache,
        ops: OpTable,
    ) -> torch.Tensor:
        """Run the MTP layer: ``next_ids`` [T] are the tokens after each position, ``hidden`` the target's
        final hidden states [T, D] at those positions. Returns draft hidden states (use :meth:`logits`)."""
        if self.mtp is None:
            raise RuntimeError("this checkpoint has no MTP layer (num_nextn_predict_layers = 0)")
        rope = self.rope_tables(meta.positions)
        return self.mtp.forward_mtp(self.model.embed_tokens(next_ids), hidden, rope, meta, cache, ops)

    def checkpoint_targets(self) -> dict[str, torch.Tensor | None]:
        """Every checkpoint tensor name mapped to the tensor it fills (``None``: present but not loaded).

        Routed experts map to views of the stacked expert tensors; the MTP layer's copies of the embedding
        and lm_head map to ``None`` because the main ones are shared.
        """
        targets: dict[str, torch.Tensor | None] = {}
        for name, p in self.named_parameters():
            if ".mlp.experts." in name:
                continue
            targets[name] = p
        for i, layer in enumerate(self.model.layers):
            if isinstance(getattr(layer, "mlp", None), MoE):
                targets.update(layer.mlp.experts.checkpoint_targets(f"model.layers.{i}.mlp.experts"))
        if self.cfg.has_mtp:
            for i in range(
                self.cfg.num_hidden_layers, self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers
            ):
                targets[f"model.layers.{i}.embed_tokens.weight"] = None
                targets[f"model.layers.{i}.shared_head.head.weight"] = None
        return targets
