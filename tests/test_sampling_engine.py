"""Sampling through the engine: seeds, n > 1, stop tokens and strings, lengths, logprobs, streamed text.

The tiny model's 300-token vocabulary maps onto the DeepSeek tokenizer's first ids, which include single
bytes of multi-byte UTF-8 characters, so random outputs exercise the no-broken-character rule.
"""

from __future__ import annotations

import pytest
import torch

from dsv.engine.sampling import SamplingParams
from dsv.tokenizer import Tokenizer
from tests.engine_helpers import (
    make_engine,
    no_leaked_pages,  # noqa: F401  (autouse fixture)
    random_prompts,
    run_all,
    tiny_model,
    tokens,
)

PROMPTS = random_prompts(6, 4, 30, seed=11)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_dir(None)


def test_seeded_sampling_is_reproducible_in_any_batch():
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=12, ignore_eos=True)
    alone = tokens(run_all(make_engine(), {"x": PROMPTS["r0"]}, params))["x"]
    crowd = {rid: p for rid, p in PROMPTS.items()}
    engine = make_engine(chunked_prefill_size=8)
    for rid, p in crowd.items():
        if rid != "r0":
            engine.add_request(rid, p, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    engine.step()
    assert tokens(run_all(engine, {"x": PROMPTS["r0"]}, params))["x"] == alone


def test_unseeded_sampling_varies():
    params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True)
    engine = make_engine()
    outs = [tokens(run_all(engine, {f"x{i}": PROMPTS["r1"]}, params))[f"x{i}"] for i in range(3)]
    assert len({tuple(o) for o in outs}) > 1


def test_n_completions_use_consecutive_seeds():
    engine = make_engine()
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = run_all(engine, {"p": PROMPTS["r2"]}, params)["p"]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    for i, c in enumerate(out.outputs):
        single = SamplingParams(temperature=1.0, seed=7 + i, max_tokens=6, ignore_eos=True)
        assert c.token_ids == tokens(run_all(engine, {f"s{i}": PROMPTS["r2"]}, single))[f"s{i}"]


def test_stop_token_ids_max_tokens_and_min_tokens():
    engine = make_engine()
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = tokens(run_all(engine, {"a": PROMPTS["r3"]}, greedy))["a"]
    stop_at = full[4]
    first = full.index(stop_at)
    out = run_all(
        engine, {"b": PROMPTS["r3"]}, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at])
    )
    c = out["b"].outputs[0]
    assert c.token_ids == full[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_at
    out = run_all(engine, {"c": PROMPTS["r3"]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out["c"].outputs[0].finish_reason == "length" and len(out["c"].outputs[0].token_ids) == 3
    banned = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at], min_tokens=first + 2)
    c = run_all(engine, {"d": PROMPTS["r3"]}, banned)["d"].outputs[0]
    assert stop_at not in c.token_ids[: first + 2]


def test_logprobs_match_model_logits():
    model = tiny_model()
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=4)
    c = run_all(engine, {"a": PROMPTS["r4"]}, params)["a"].outputs[0]
    assert len(c.logprobs) == 3
    for step in c.logprobs:
        assert len(step) in (4, 5)  # top-4 plus the sampled token when it is not among them
    ids = PROMPTS["r4"] + c.token_ids[:1]
    # Reference: log_softmax of the model's logits for the first generated token, via the one-request loop.
    from dsv.backend.reference import ReferenceBackend
    from dsv.engine.batch import SeqChunk, build_metadata
    from dsv.engine.kv_pool import CacheSpec, KVPool

    pool = KVPool(model.cfg, CacheSpec(page_size=4), 32, model.dtype)
    meta = build_metadata([SeqChunk(0, len(ids) - 1, pool.allocate(-(-len(ids) // 4)))], 4)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids[:-1]), meta, pool.layers, ReferenceBackend().ops())
        ref = torch.log_softmax(model.logits(hidden[-1:])[0], -1)
    first = c.logprobs[0]
    assert first[c.token_ids[0]].rank == 1
    for tid, lp in first.items():
        assert lp.logprob == pytest.approx(ref[tid].item(), abs=1e-5)
    assert c.cumulative_logprob == pytest.approx(sum(s[t].logprob for s, t in zip(c.logprobs, c.token_ids)))


def test_streamed_text_has_no_broken_characters(tok):
    engine = make_engine(tokenizer=tok)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, skip_special_tokens=True)
    pieces: dict[str, list[str]] = {rid: [] for rid in PROMPTS}
    ids: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, params)
    while engine.has_unfinished():
        for out in engine.step():
            pieces[out.request_id].append(out.outputs[0].text)
            ids[out.request_id] += out.outputs[0].token_ids
    for rid in PROMPTS:
        assert "".join(pieces[rid]) == tok.decode(ids[rid], skip_special_tokens=True)
        assert not any(p.endswith("\ufffd") for p in pieces[rid][:-1])


def test_stop_strings_cut_the_text(tok):
    engine = make_engine(tokenizer=tok)
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = run_all(engine, {"a": PROMPTS["r5"]}, base)["a"].outputs[0].text
    windows = [full[i : i + 2] for i in range(len(full) // 2, len(full) - 1)]
    stop = next(w for w in windows if "\ufffd" not in w)
    cut = full.index(stop)
    for include in (False, True):
        params = SamplingParams(
            temperature=0,
            max_tokens=30,
            ignore_eos=True,
            stop=["\x00never", stop],
            include_stop_str_in_output=include,
        )
        c = run_all(engine, {"b": PROMPTS["r5"]}, params)["b"].outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == full[: cut + (len(stop) if include else 0)]
