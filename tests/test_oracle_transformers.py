"""The reference backend against an implementation nobody here wrote: transformers' DeepseekV32ForCausalLM.

Tiny random checkpoints are written with ``save_pretrained`` (the transformers 5 config form, float32) and loaded
by dsv's loader. Greedy token ids must be identical in float32, both when every sequence fits in ``index_topk``
(exactly dense attention) and when ``index_topk`` is far below the sequence length (sparse). transformers has no
FP8 and no Hadamard in its indexer, so dsv runs with ``indexer_quant="none"`` (the Hadamard rotation is
orthonormal and preserves the scores up to fp32 rounding).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv.backend.reference import ReferenceBackend  # noqa: E402
from dsv.engine.kv_pool import CacheSpec  # noqa: E402
from dsv.engine.sampling import SamplingParams  # noqa: E402
from dsv.engine.single import SingleRequestGenerator  # noqa: E402
from dsv.model.loader import load_model  # noqa: E402

PROMPT_LEN = 24
NEW_TOKENS = 12


def _hf_config(index_topk: int):
    return transformers.DeepseekV32Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=index_topk,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def _write_checkpoint(path: Path, index_topk: int, seed: int):
    torch.manual_seed(seed)
    hf = transformers.DeepseekV32ForCausalLM(_hf_config(index_topk)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "e_score_correction_bias" in name:
                p.normal_(0, 0.1)  # initialized to zero; make the bias matter for expert choice
            elif p.dim() > 1:
                p.normal_(0, 0.1)  # larger than the default init so the outputs are far from uniform
    hf.save_pretrained(path)
    return hf


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    # No EOS for transformers (dsv runs with ignore_eos): EOS must neither stop nor be suppressed.
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("index_topk", "page_size"),
    [(64, 64), (64, 1), (6, 4), (6, 1)],
    ids=["dense-page64", "dense-page1", "sparse-page4", "sparse-page1"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_ids_match_transformers(tmp_path: Path, index_topk: int, page_size: int, seed: int):
    hf = _write_checkpoint(tmp_path, index_topk, seed)
    prompt = torch.randint(2, 300, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
    expected = _hf_greedy(hf, prompt)

    model = load_model(tmp_path, torch.float32)
    assert model.cfg.index_topk == index_topk
    spec = CacheSpec(page_size=page_size, kv_cache_dtype="auto", indexer_quant="none")
    gen = SingleRequestGenerator(model, ReferenceBackend().ops(), spec, max_total_tokens=64)
    got = gen.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert got == expected


def test_prefill_logits_match_transformers(tmp_path: Path):
    """Logits of a sparse prefill agree with transformers to fp32 rounding (observed ~2e-7)."""
    hf = _write_checkpoint(tmp_path, 6, seed=2)
    ids = torch.randint(2, 300, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    model = load_model(tmp_path, torch.float32)
    from dsv.engine.batch import SeqChunk, build_metadata
    from dsv.engine.kv_pool import KVPool

    pool = KVPool(model.cfg, CacheSpec(page_size=4, indexer_quant="none"), 16, torch.float32)
    meta = build_metadata([SeqChunk(0, 30, pool.allocate(8))], 4)
    with torch.no_grad():
        ours = model.logits(model(ids, meta, pool.layers, ReferenceBackend().ops()))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
