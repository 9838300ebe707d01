"""``--enable-torch-compile``: the decode forward compiled by inductor on the CPU, one graph, same tokens."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import dsv.engine.llm_engine as llm_engine
from dsv.engine.sampling import SamplingParams
from tests.engine_helpers import make_engine, random_prompts, run_all, tokens
from tests.model_factory import random_tiny_model, tiny_config

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_compiled_decode_is_one_graph_and_gives_the_eager_tokens():
    """An FP8 model with an FP8 indexer cache: dequantized weights, the dense MoE form, the cache custom
    ops; every pure decode step goes through the compiled forward, which dynamo captures whole."""
    model = random_tiny_model(tiny_config(fp8=True, kv_lora_rank=128), dtype=torch.bfloat16, seed=3)
    prompts = random_prompts(5, 10, 30, seed=5)  # not 4: a batch the size of the head count specializes
    eager = tokens(run_all(make_engine(model), prompts, PARAMS))
    torch._dynamo.reset()
    counters.clear()
    engine = make_engine(model, enable_torch_compile=True)
    assert "torch.compile" in engine.decode_runner.describe() and engine.decode_runner.whole_graph
    assert tokens(run_all(engine, prompts, PARAMS)) == eager
    assert engine.runner.steps["decode_runner"] >= PARAMS.max_tokens - 1
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # Another batch size and longer contexts reuse the graph (shapes are symbolic, not specialized).
    more = random_prompts(3, 35, 50, seed=6)
    assert tokens(run_all(engine, more, PARAMS)) == tokens(run_all(make_engine(model), more, PARAMS))
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_is_refused_next_to_decode_graphs(monkeypatch):
    monkeypatch.setattr(llm_engine, "build_decode_runner", lambda *a, **k: object())
    with pytest.raises(ValueError, match="--disable-cuda-graph to compile instead"):
        make_engine(enable_torch_compile=True)


def test_models_with_graph_breaks_keep_the_module_guards():
    """bf16 experts run the reference MoE (a graph break): the compiled forward then keeps dynamo's guards on
    the modules, which tell one layer's resume function from the next one's, and is not compiled whole."""
    model = random_tiny_model(tiny_config(fp8=False), dtype=torch.bfloat16, seed=3)
    engine = make_engine(model, enable_torch_compile=True)
    assert not engine.decode_runner.whole_graph


def test_weights_past_the_dequantization_cache_bound_get_no_second_copy(monkeypatch):
    """With no room in the dequantization cache, the FP8 weights keep the reference linear and MoE (graph
    breaks) instead of a copy beyond the bound, and the tokens are still eager's."""
    import dsv.ops.linear as linear_mod

    model = random_tiny_model(tiny_config(fp8=True, kv_lora_rank=128), dtype=torch.bfloat16, seed=4)
    prompts = random_prompts(3, 8, 20, seed=7)
    eager = tokens(run_all(make_engine(model), prompts, PARAMS))
    monkeypatch.setattr(linear_mod, "_CACHE_LIMIT", 0)
    linear_mod._CACHE.clear()
    monkeypatch.setattr(linear_mod, "_cache_bytes", 0)
    torch._dynamo.reset()
    engine = make_engine(model, enable_torch_compile=True)
    assert not engine.decode_runner.whole_graph
    assert not any(hasattr(p, "dsv_dequantized") for p in model.parameters())
    assert tokens(run_all(engine, prompts, PARAMS)) == eager
