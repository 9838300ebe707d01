"""Model-level checks that need no checkpoint on disk."""

from __future__ import annotations

import pytest
import torch

from dsv.backend.reference import ReferenceBackend
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.kv_pool import CacheSpec, KVPool
from tests.model_factory import random_tiny_model, tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny_config()
    return random_tiny_model(cfg), cfg


SPEC = CacheSpec(page_size=4, indexer_quant="none")


def _prefill(model, ids, spec=SPEC):
    pool = KVPool(model.cfg, spec, 64, model.dtype, with_mtp=True)
    pages = pool.allocate(-(-len(ids) // spec.page_size))
    meta = build_metadata([SeqChunk(0, len(ids), pages)], spec.page_size)
    with torch.no_grad():
        return model(ids, meta, pool.layers, ReferenceBackend().ops()), pool, meta


def test_mtp_layer_runs_and_uses_embedding_first(tiny_model):
    model, cfg = tiny_model
    ids = torch.arange(5, 17)
    hidden, pool, meta = _prefill(model, ids)
    ops = ReferenceBackend().ops()
    mtp_cache = pool.layers[cfg.num_hidden_layers]
    with torch.no_grad():
        draft = model.forward_mtp(ids, hidden, meta, mtp_cache, ops)
        logits = model.logits(draft)
        assert logits.shape == (len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
        # eh_proj sees [enorm(emb) ; hnorm(h)]: zeroing its first half of input columns removes the embedding.
        mtp = model.mtp
        saved = mtp.eh_proj.weight.clone()
        mtp.eh_proj.weight[:, : cfg.hidden_size] = 0
        no_emb = model.forward_mtp(ids.flip(0), hidden, meta, mtp_cache, ops)
        again = model.forward_mtp(ids, hidden, meta, mtp_cache, ops)
        mtp.eh_proj.weight.copy_(saved)
    torch.testing.assert_close(no_emb, again)  # token ids no longer matter


def test_fp8_model_close_to_dequantized_twin():
    """An FP8 checkpoint agrees with its dequantized float twin.

    Tolerance: the FP8 model also quantizes activations per 1x128 group (e4m3: 3 mantissa bits, up to 6.25%
    relative rounding error per value, ~2-3% rms), and every projection of 3 layers adds such noise to both its
    inputs and weights; measured ~9% mean relative logit error on seeds 0-2. We accept 15% mean relative error
    and 10% of the logit range as the worst case. The prompt fits in index_topk (dense attention) because in the
    sparse regime the indexer's discrete top-k choice can flip under FP8 noise, which is a different comparison.
    """
    cfg8 = tiny_config(fp8=True)
    m8 = random_tiny_model(cfg8, seed=1)
    twin = random_tiny_model(tiny_config(), seed=1)
    targets = twin.checkpoint_targets()
    from dsv.ops.quant import weight_dequant

    with torch.no_grad():
        for name, t in m8.checkpoint_targets().items():
            if t is None or name.endswith("weight_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                s = m8.checkpoint_targets()[name + "_scale_inv"]
                targets[name].copy_(weight_dequant(t, s, cfg8.quant.block_size))
            else:
                targets[name].copy_(t.to(targets[name].dtype))
    ids = torch.randint(0, cfg8.vocab_size, (cfg8.index_topk,), generator=torch.Generator().manual_seed(0))
    h8, _, _ = _prefill(m8, ids)
    hf, _, _ = _prefill(twin, ids)
    l8, lf = m8.logits(h8), twin.logits(hf)
    spread = (lf.max() - lf.min()).item()
    assert ((l8 - lf).abs().mean() / lf.abs().mean()).item() < 0.15
    assert (l8 - lf).abs().max().item() < 0.10 * spread


def test_checkpoint_targets_cover_every_parameter(tiny_model):
    model, _ = tiny_model
    targets = model.checkpoint_targets()
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in targets
    assert targets["model.layers.3.shared_head.head.weight"] is None  # MTP copy of lm_head is shared
    n_params = sum(p.numel() for p in model.parameters())
    n_targets = sum(t.numel() for t in targets.values() if t is not None)
    assert n_params == n_targets
