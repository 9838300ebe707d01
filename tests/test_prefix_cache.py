"""Prefix caching through the engine: hits, the disable flag, flushing, LRU eviction, and a property test that
reusing pages never changes an output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.engine.sampling import SamplingParams
from tests.engine_helpers import (
    GREEDY,
    make_engine,
    no_leaked_pages,  # noqa: F401  (autouse fixture)
    random_prompts,
    run_all,
    tokens,
)

PAGE = 4


def test_repeated_prompt_hits_every_full_page_but_the_last_token():
    engine = make_engine(page_size=PAGE)
    prompt = random_prompts(1, 23, 23, seed=1)["r0"]
    first = run_all(engine, {"a": prompt})["a"]
    second = run_all(engine, {"b": prompt})["b"]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(prompt) - 1) // PAGE * PAGE == 20
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    # A prompt that is a whole number of pages recomputes its last page (one token must produce logits).
    exact = prompt[:20]
    run_all(engine, {"c": exact})
    assert run_all(engine, {"d": exact})["d"].num_cached_tokens == 16
    stats = engine.stats()
    assert stats.prefix_hit_tokens > 0 and 0 < stats.prefix_hit_rate < 1


def test_generated_tokens_are_cached_too():
    engine = make_engine(page_size=PAGE)
    prompt = random_prompts(1, 6, 6, seed=2)["r0"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = run_all(engine, {"a": prompt}, params)["a"].outputs[0].token_ids
    follow_up = prompt + out  # a chat turn that continues from the answer
    assert run_all(engine, {"b": follow_up})["b"].num_cached_tokens == (len(prompt) + 11) // PAGE * PAGE


def test_disabled_prefix_cache_never_hits():
    engine = make_engine(page_size=PAGE, enable_prefix_caching=False)
    prompt = random_prompts(1, 30, 30, seed=3)["r0"]
    run_all(engine, {"a": prompt})
    assert run_all(engine, {"b": prompt})["b"].num_cached_tokens == 0
    assert engine.block_manager.num_cached == 0 and engine.stats().prefix_hit_tokens == 0


def test_flush_forgets_everything():
    engine = make_engine(page_size=PAGE)
    prompt = random_prompts(1, 30, 30, seed=4)["r0"]
    run_all(engine, {"a": prompt})
    assert engine.block_manager.num_cached > 0
    engine.reset_prefix_cache()
    engine.step()
    assert engine.block_manager.num_cached == 0
    assert engine.block_manager.num_free == engine.block_manager.num_pages - 1
    assert run_all(engine, {"b": prompt})["b"].num_cached_tokens == 0


def test_flush_while_running_keeps_running_requests_intact():
    engine = make_engine(page_size=PAGE)
    prompts = random_prompts(3, 20, 30, seed=5)
    expected = tokens(run_all(make_engine(page_size=PAGE, enable_prefix_caching=False), prompts))
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    first = {out.request_id: out.outputs[0].token_ids for out in engine.step()}
    engine.reset_prefix_cache()
    got = {rid: first.get(rid, []) + t for rid, t in tokens(run_all(engine, {})).items()}
    assert got == expected


def test_lru_eviction_keeps_the_most_recent_prefixes():
    # 24 usable pages of 4 tokens; each prompt (33 tokens + 1 generated) caches 8 full pages.
    engine = make_engine(page_size=PAGE, max_total_tokens=96)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = random_prompts(4, 33, 33, seed=6)
    for rid in ("r0", "r1", "r2", "r3"):  # r0's pages are the least recently used when r3 needs room
        run_all(engine, {rid: prompts[rid]}, params)
    assert run_all(engine, {"again3": prompts["r3"]}, params)["again3"].num_cached_tokens == 32
    assert run_all(engine, {"again2": prompts["r2"]}, params)["again2"].num_cached_tokens == 32
    assert run_all(engine, {"again0": prompts["r0"]}, params)["again0"].num_cached_tokens == 0


@given(
    shared=st.lists(st.integers(2, 5), min_size=0, max_size=14),
    tails=st.lists(st.lists(st.integers(2, 5), min_size=1, max_size=6), min_size=1, max_size=5),
    page_size=st.sampled_from([1, 2, 4]),
    waves=st.integers(1, 3),
)
@settings(max_examples=15, deadline=None)
def test_prefix_reuse_never_changes_outputs(shared, tails, page_size, waves):
    prompts = {f"p{i}": shared + t for i, t in enumerate(tails)}
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = tokens(run_all(make_engine(page_size=page_size, enable_prefix_caching=False), prompts, params))
    engine = make_engine(page_size=page_size, max_total_tokens=64, chunked_prefill_size=8)
    got = {}
    items = list(prompts.items())
    for w in range(waves):  # later waves find earlier waves' pages in the cache
        got.update(tokens(run_all(engine, dict(items[w::waves]), params)))
    assert got == expected
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used == 0
