"""Preemption when pages run out, abort at any moment, validation, streaming deltas and the threaded driver."""

from __future__ import annotations

import threading
import time

import pytest

from dsv.engine.outputs import RequestOutput
from dsv.engine.sampling import SamplingParams
from tests.engine_helpers import (
    GREEDY,
    alone_single,
    assert_no_leaks,
    make_engine,
    no_leaked_pages,  # noqa: F401  (autouse fixture)
    random_prompts,
    run_all,
    tiny_model,
    tokens,
)

PROMPTS = random_prompts(8, 10, 30, seed=3)
LONG = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def alone() -> dict[str, list[int]]:
    return {rid: alone_single(tiny_model(), p, LONG) for rid, p in PROMPTS.items()}


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "noprefix"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_preemption_recomputes_and_matches_alone(alone, page_size, prefix):
    """A pool that holds about two sequences at a time forces preemption; outputs must not change."""
    engine = make_engine(
        page_size=page_size, max_total_tokens=104, chunked_prefill_size=32, enable_prefix_caching=prefix
    )
    assert tokens(run_all(engine, PROMPTS, LONG)) == alone
    assert engine.stats().num_preemptions > 0


def test_single_request_may_fill_the_whole_pool():
    engine = make_engine(page_size=4, max_total_tokens=32)
    prompt = random_prompts(1, 12, 12, seed=9)["r0"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = tokens(run_all(engine, {"a": prompt}, params))["a"]
    assert got == alone_single(tiny_model(), prompt, params)
    with pytest.raises(ValueError, match="exceeds"):
        engine.add_request("b", prompt, SamplingParams(max_tokens=21))


def test_abort_running_and_waiting_requests(alone):
    engine = make_engine(page_size=4, max_running_requests=3, chunked_prefill_size=16)
    results = {rid: RequestOutput(rid, p, []) for rid, p in PROMPTS.items()}
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, LONG)
    aborted = {"r0", "r1", "r7"}  # r0, r1 running (mid-prefill or decoding), r7 still waiting
    for step in range(500):
        if step == 4:
            for rid in aborted:
                engine.abort(rid)
        for delta in engine.step():
            results[delta.request_id].merge(delta)
        if not engine.has_unfinished():
            break
    assert_no_leaks(engine)
    for rid, out in results.items():
        assert out.finished
        c = out.outputs[0]
        if rid in aborted:
            assert c.finish_reason == "abort"
            assert c.token_ids == alone[rid][: len(c.token_ids)]
        else:
            assert c.finish_reason == "length" and c.token_ids == alone[rid]
    engine.abort("r3")  # finished or unknown ids are ignored
    engine.abort("nope")
    assert engine.step() == []


def test_validation_errors_are_raised_at_add():
    engine = make_engine()
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="lie in"):
        engine.add_request("a", [1, 300], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", [5], SamplingParams(stop=["x"]))
    engine.add_request("a", [5, 6], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6], GREEDY)


def test_step_returns_deltas_until_finished():
    engine = make_engine()
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert [len(d.outputs[0].token_ids) for d in deltas] == [1, 1, 1, 1]
    assert [d.finished for d in deltas] == [False, False, False, True]
    assert deltas[-1].outputs[0].finish_reason == "length"
    assert deltas[-1].metrics.first_token_time is not None


def test_threaded_driver_with_concurrent_add_and_abort(alone):
    """A background thread steps; the main thread adds and aborts at any moment (the server's pattern)."""
    engine = make_engine(page_size=4, chunked_prefill_size=16)
    results: dict[str, RequestOutput] = {}
    done = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not done.is_set() or engine.has_unfinished():
                if not engine.wait_for_work(timeout=0.01):
                    continue
                for delta in engine.step():
                    results.setdefault(delta.request_id, RequestOutput(delta.request_id, [], [])).merge(delta)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    for i, (rid, p) in enumerate(PROMPTS.items()):
        engine.add_request(rid, p, LONG)
        time.sleep(0.002 * i)
        if rid == "r4":
            engine.abort("r2")
    done.set()
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    for rid, out in results.items():
        c = out.outputs[0]
        assert out.finished
        expected = alone[rid] if c.finish_reason == "length" else alone[rid][: len(c.token_ids)]
        assert c.token_ids == expected
    assert set(results) == set(PROMPTS)


def test_kv_pool_sizing_summary_and_mtp_caches(capsys):
    engine = make_engine(page_size=4, max_total_tokens=64, enable_mtp=True, log_stats=True)
    model = tiny_model()
    assert len(engine.pool.layers) == model.cfg.num_hidden_layers + 1  # the MTP layer's caches
    assert engine.pool.capacity_tokens == 64 and engine.max_model_len == 64
    line = capsys.readouterr().err
    # kv_lora_rank 128 + rope 8 in fp32, and 16 fp8 indexer bytes + one fp32 scale + the 16 bf16 values of
    # the CPU's read copy, over 4 layers
    assert "64 tokens (16 pages of 4)" in line and f"{4 * ((128 + 8) * 4 + 16 + 4 + 32)} bytes/token" in line
    fp8 = make_engine(page_size=1, max_total_tokens=8, kv_cache_dtype="fp8_e4m3")
    assert fp8.pool.layers[0].mla.bytes_per_token == 128 + 4 + 2 * 8  # FlashMLA layout: 656 B at full size
