"""Shared helpers for the engine tests: tiny in-memory models, engines, and the no-leaked-page check."""

from __future__ import annotations

import functools

import pytest
import torch

from dsv.backend.reference import ReferenceBackend
from dsv.engine.config import EngineConfig
from dsv.engine.kv_pool import CacheSpec
from dsv.engine.llm_engine import LLMEngine
from dsv.engine.outputs import RequestOutput
from dsv.engine.sampling import SamplingParams
from dsv.engine.single import SingleRequestGenerator
from tests.model_factory import random_tiny_model, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

_ENGINES: list[LLMEngine] = []


@functools.lru_cache(maxsize=4)
def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model whose MLA latent (128) allows the FP8 KV layout; index_topk 8 < most prompts."""
    return random_tiny_model(tiny_config(kv_lora_rank=128), dtype=dtype, seed=seed)


def make_engine(model=None, tokenizer=None, backend=None, **config) -> LLMEngine:
    """An engine on the reference backend (or ``backend``, e.g. one with decode graphs); registered for the
    leak check that runs after each test."""
    config.setdefault("max_total_tokens", 4096)
    config.setdefault("page_size", 4)
    config.setdefault("log_stats", False)
    ops = (backend or ReferenceBackend()).ops()
    engine = LLMEngine(model or tiny_model(), ops, EngineConfig(**config), tokenizer, backend=backend)
    _ENGINES.append(engine)
    return engine


def run_all(engine: LLMEngine, prompts: dict[str, list[int]], params=GREEDY) -> dict[str, RequestOutput]:
    """Add every prompt, step until nothing is left, return merged outputs by request id (requests added
    earlier by the caller included)."""
    results = {}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
        results[rid] = RequestOutput(rid, list(ids), [])
    while engine.has_unfinished():
        for delta in engine.step():
            results.setdefault(delta.request_id, RequestOutput(delta.request_id, [], [])).merge(delta)
    return results


def tokens(results: dict[str, RequestOutput]) -> dict[str, list[int]]:
    return {rid: r.outputs[0].token_ids for rid, r in results.items()}


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 300) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return {f"r{i}": torch.randint(2, vocab, (n_,), generator=g).tolist() for i, n_ in enumerate(lengths)}


def alone_single(model, prompt: list[int], params=GREEDY, spec: CacheSpec | None = None) -> list[int]:
    """The same request through the single-request loop (no batching, no chunking, no prefix cache)."""
    spec = spec or CacheSpec(page_size=4)
    gen = SingleRequestGenerator(model, ReferenceBackend().ops(), spec, len(prompt) + params.max_tokens + 8)
    return gen.generate(prompt, params)


def assert_no_leaks(engine: LLMEngine) -> None:
    """Every page is free or an unreferenced prefix-cache entry; no request is left behind."""
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_used == 0, f"{bm.num_used} KV pages still referenced"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.scheduler.requests and not engine._parents


@pytest.fixture(autouse=True)
def no_leaked_pages():
    """After every test: every engine the test built holds no leaked page (import this into test modules)."""
    _ENGINES.clear()
    yield
    engines = list(_ENGINES)
    _ENGINES.clear()
    for engine in engines:
        while engine.has_unfinished():  # a test may leave requests running: abort them first
            for rid in list(engine._parents):
                engine.abort(rid)
            engine.step()
        assert_no_leaks(engine)
