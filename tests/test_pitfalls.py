"""One test per pitfall listed at the end of the model reference (shared/reference/deepseek-v32-model.md §10)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv.config import ModelConfig, RopeConfig
from dsv.ops.indexer import indexer_logits, topk_positions
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer
from dsv.ops.moe import moe_route
from dsv.ops.norm import hadamard_rotate
from dsv.ops.quant import act_quant, fp8_kv_bytes, weight_dequant, weight_quant
from dsv.ops.rope import apply_rope_interleaved, apply_rope_neox, rope_cos_sin, rope_inv_freq
from tests.test_config import ORIGINAL


@pytest.fixture(scope="module")
def tiny_model():
    from tests.model_factory import random_tiny_model, tiny_config

    cfg = tiny_config()
    return random_tiny_model(cfg), cfg


#: The official DeepSeek-V3.2-Exp config, parsed: its rope settings are what pitfall 6 is about.
V32 = ModelConfig.from_dict(ORIGINAL)
V32_ROPE = V32.rope


def test_1_indexer_rope_is_half_split_and_mla_rope_is_interleaved():
    x = torch.randn(3, 2, 8)
    cos, sin = rope_cos_sin(rope_inv_freq(RopeConfig(), 8), torch.tensor([1, 5, 9]))
    neox = apply_rope_neox(x, cos, sin)
    inter = apply_rope_interleaved(x, cos, sin)
    # half-split: element i pairs with i + 4; interleaved: element 2i pairs with 2i + 1
    c, s = cos[:, None, :], sin[:, None, :]
    torch.testing.assert_close(neox[..., :4], x[..., :4] * c - x[..., 4:] * s)
    torch.testing.assert_close(neox[..., 4:], x[..., 4:] * c + x[..., :4] * s)
    torch.testing.assert_close(inter[..., 0::2], x[..., 0::2] * c - x[..., 1::2] * s)
    torch.testing.assert_close(inter[..., 1::2], x[..., 1::2] * c + x[..., 0::2] * s)
    assert not torch.allclose(neox, inter)


def test_2_rope_slot_order(tiny_model):
    """Indexer heads are [rope | nope]; MLA q heads are [nope | rope]; kv_a output is [latent | rope]."""
    model, cfg = tiny_model
    attn = model.model.layers[0].self_attn
    idx = attn.indexer
    x = torch.randn(2, cfg.hidden_size)
    from dsv.backend.reference import ReferenceBackend

    ops = ReferenceBackend().ops()
    # Position changes rotate only the first rope_dim entries of the indexer key (before the Hadamard).
    raw = []
    for pos in (0, 7):
        rope = model.rope_tables(torch.tensor([pos, pos]))
        k = idx.keys(x, rope, ops)
        raw.append(hadamard_rotate(k))  # H is its own inverse: recover the pre-rotation key
    diff = (raw[0] - raw[1]).abs().amax(0)
    assert diff[: idx.rope_dim].max() > 1e-3
    assert diff[idx.rope_dim :].max() < 1e-5
    # MLA: the rope part of q is its last qk_rope_head_dim entries, and kv_a's last rope dims are the rope key.
    assert attn.nope + attn.rope_dim == cfg.qk_head_dim
    assert attn.kv_a_proj_with_mqa.out_features == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_3_indexer_key_uses_layernorm_with_bias(tiny_model):
    model, cfg = tiny_model
    idx = model.model.layers[0].self_attn.indexer
    from dsv.backend.reference import ReferenceBackend

    ops = ReferenceBackend().ops()
    x = torch.randn(3, cfg.hidden_size)
    rope = model.rope_tables(torch.zeros(3, dtype=torch.long))  # position 0: rope is the identity
    before = idx.keys(x, rope, ops)
    with torch.no_grad():
        idx.k_norm.bias.add_(0.5)
    after = idx.keys(x, rope, ops)
    with torch.no_grad():
        idx.k_norm.bias.sub_(0.5)
    # A LayerNorm bias shifts every pre-rotation entry by the same amount (RMSNorm has no bias).
    shift = hadamard_rotate(after) - hadamard_rotate(before)
    torch.testing.assert_close(shift, torch.full_like(shift, 0.5), atol=1e-5, rtol=0)


def test_4_hadamard_then_power_of_two_scales():
    h = hadamard_rotate(torch.eye(8))
    torch.testing.assert_close(h @ h.T, torch.eye(8), atol=1e-6, rtol=0)  # orthonormal
    torch.testing.assert_close(
        h[1], torch.tensor([1, -1, 1, -1, 1, -1, 1, -1]) / math.sqrt(8)
    )  # Sylvester order
    x = torch.randn(5, 128) * 3
    _, s = act_quant(x, 128, "ue8m0")
    assert torch.all(torch.log2(s) == torch.round(torch.log2(s)))
    assert torch.all(s >= x.abs().amax(-1, keepdim=True) / 448)
    _, s0 = act_quant(torch.zeros(1, 128), 128, "ue8m0")
    assert s0.item() == 2.0 ** math.ceil(math.log2(1e-4 / 448))  # amax floor 1e-4


def test_5_relu_per_head_before_weighting_with_negative_weights():
    from dsv.engine.batch import SeqChunk, build_metadata

    cache = IndexKCacheLayer(2, 4, 4, quantized=False, dtype=torch.float32, device="cpu")
    k = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    meta = build_metadata([SeqChunk(0, 2, [1])], 4)
    cache.write(meta.slot_mapping, k)
    q = torch.tensor([[[1.0, -1, 0, 0], [-1.0, 1, 0, 0]]] * 2)  # two heads with opposite signs
    w = torch.tensor([[1.0, -2.0]] * 2)
    scores = indexer_logits(q, w, cache, meta)
    # key 0: head0 relu(1)=1 *1, head1 relu(-1)=0 -> 1; key 1: head0 0, head1 relu(1)=1 * -2 -> -2
    assert scores[1].tolist() == [1.0, -2.0]
    assert scores[0, 1] == float("-inf")  # causal


def test_6_yarn_frequencies_and_softmax_scale():
    inv = rope_inv_freq(V32_ROPE, 64).double()
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ramp = ((torch.arange(32, dtype=torch.float64) - 10) / 13).clamp(0, 1)
    expected = base / 40 * ramp + base * (1 - ramp)
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)
    assert inv[10] == pytest.approx(base[10].item(), rel=1e-6)  # low = 10 unchanged
    assert inv[23] == pytest.approx(base[23].item() / 40, rel=1e-6)  # high = 23 divided by 40
    assert V32.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_7_router_bias_only_selects():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.4, 0.3, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = moe_route(logits, bias, top_k=2, n_group=2, topk_group=1, renormalize=True, scaling=2.5)
    # Group 0 (experts 0-3) wins on biased top-2 sum; within it experts 2, 3 are chosen by the bias...
    assert sorted(ids[0].tolist()) == [2, 3]
    # ...but weighted by their unbiased sigmoid scores, renormalized and scaled by 2.5.
    s = torch.sigmoid(logits[0, [2, 3]])
    torch.testing.assert_close(w[0].sort().values, (s / s.sum() * 2.5).sort().values)
    # Group score is the sum of the top-2, not the max: group 1 has the single best biased score here.
    bias2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0])
    logits2 = torch.tensor([[2.0, 2.0, -9, -9, 0.0, -9, -9, -9]])
    _, ids2 = moe_route(logits2, bias2, top_k=2, n_group=2, topk_group=1, renormalize=True, scaling=1.0)
    assert sorted(ids2[0].tolist()) == [0, 1]


def test_8_topk_is_min_of_topk_and_visible_keys():
    scores = torch.tensor([[0.5, float("-inf"), float("-inf")], [0.1, 0.9, float("-inf")], [0.3, 0.2, 0.1]])
    idx = topk_positions(scores, 2)
    assert idx[0].tolist() == [0, -1]  # one visible key: selected, rest padded with -1
    assert sorted(idx[1].tolist()) == [0, 1]
    assert sorted(idx[2].tolist()) == [0, 1]
    wide = topk_positions(scores, 5)
    assert wide.shape == (3, 5) and (wide[2] >= 0).sum() == 3


def test_9_chunked_prefill_matches_one_shot(tiny_model):
    """Prefill in chunks on top of a cached prefix (offset causal mask) equals one-shot prefill, dense and sparse."""
    from dsv.backend.reference import ReferenceBackend
    from dsv.engine.batch import SeqChunk, build_metadata
    from dsv.engine.kv_pool import CacheSpec, KVPool

    model, cfg = tiny_model
    ops = ReferenceBackend().ops()
    ids = torch.randint(
        0, cfg.vocab_size, (cfg.index_topk * 2 + 5,), generator=torch.Generator().manual_seed(3)
    )
    n = len(ids)

    def run(cuts: list[int]) -> torch.Tensor:
        pool = KVPool(cfg, CacheSpec(page_size=4, indexer_quant="none"), 64, model.dtype)
        pages = pool.allocate(-(-n // 4))
        outs, start = [], 0
        for end in [*cuts, n]:
            meta = build_metadata([SeqChunk(start, end - start, pages)], 4)
            outs.append(model(ids[start:end], meta, pool.layers, ops))
            start = end
        return torch.cat(outs)

    with torch.no_grad():
        full = run([])
        torch.testing.assert_close(run([3, cfg.index_topk + 1]), full, atol=2e-5, rtol=1e-4)


def test_10_fp8_layouts_and_weight_scale():
    assert fp8_kv_bytes(512, 64) == 656
    cache = MLACacheLayer(2, 64, 512, 64, "fp8", torch.float32, "cpu")
    assert cache.bytes_per_token == 656
    latent, rope = torch.randn(3, 512), torch.randn(3, 64)
    cache.write(torch.tensor([0, 64, 127]), latent, rope)
    row = cache.flat[64]
    scales = row[512:528].view(torch.float32)
    torch.testing.assert_close(scales, latent[1].view(4, 128).abs().amax(-1) / 448)  # amax/448, not rounded
    torch.testing.assert_close(
        row[528:].view(torch.bfloat16).float(), rope[1].bfloat16().float()
    )  # rope unquantized
    assert IndexKCacheLayer(1, 64, 128, True, torch.float32, "cpu").bytes_per_token == 132
    # weight_scale_inv is multiplied; a 576-row weight has 5 ragged row blocks
    w = torch.randn(576, 256)
    q, s = weight_quant(w)
    assert s.shape == (5, 2)
    torch.testing.assert_close(weight_dequant(q, s), w, atol=0.07 * w.abs().max().item(), rtol=0.07)
    torch.testing.assert_close(weight_dequant(q, s * 2), 2 * weight_dequant(q, s))


def test_dequantized_weight_cache_follows_in_place_updates():
    """The reference linear keeps dequantized FP8 weights; an in-place reload must invalidate the copy."""
    from dsv.ops.linear import linear

    q, s = weight_quant(torch.randn(64, 256))
    x = torch.randn(3, 256)
    before = linear(x, q, s)
    q2, s2 = weight_quant(torch.randn(64, 256))
    q.copy_(q2)
    s.copy_(s2)
    after = linear(x, q, s)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, linear(x, q2, s2))


def test_fused_moe_without_room_in_the_dequant_cache_dequantizes_only_routed_experts(monkeypatch):
    """Stacked FP8 experts too big for the dequantization cache (a full V3.2 layer: 15 GB per fp32 weight) are
    dequantized per routed expert, with the same result as the cached stacked copy."""
    import dsv.ops.linear as linear_mod
    import dsv.ops.moe as moe_mod
    from dsv.ops.moe import ExpertWeights, fused_moe

    g = torch.Generator().manual_seed(4)
    e, inter, dim = 6, 128, 256
    ws = {
        n: [weight_quant(torch.randn(*shape, generator=g) * 0.05) for _ in range(e)]
        for n, shape in (("w1", (inter, dim)), ("w3", (inter, dim)), ("w2", (dim, inter)))
    }
    kw = {n: torch.stack([q for q, _ in v]) for n, v in ws.items()}
    kw.update({n + "_scale": torch.stack([s for _, s in v]) for n, v in ws.items()})
    experts = ExpertWeights(**kw, act_scale_fmt="ue8m0")
    x = torch.randn(9, dim, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, 2]] * 5 + [[2, 5]] * 4)
    weights = torch.rand(9, 2, generator=g)
    cached = fused_moe(x, weights, ids, experts)
    monkeypatch.setattr(linear_mod, "_CACHE_LIMIT", 0)
    monkeypatch.setattr(linear_mod, "_CACHE", {})
    dequantized: list[tuple[int, ...]] = []
    real = moe_mod.weight_dequant
    monkeypatch.setattr(
        moe_mod, "weight_dequant", lambda w, *a: dequantized.append(tuple(w.shape)) or real(w, *a)
    )
    assert torch.equal(fused_moe(x, weights, ids, experts), cached)
    assert len(dequantized) == 3 * 3  # three weights of the three routed experts (0, 2, 5), nothing stacked
