"""``from dsv import LLM, SamplingParams``: vLLM's offline API on an in-memory model and on the default one."""

from __future__ import annotations

import pytest
import torch

import dsv
from dsv import LLM, SamplingParams
from tests.engine_helpers import alone_single, assert_no_leaks, random_prompts, tiny_model

PROMPTS = random_prompts(5, 3, 25, seed=21)


def test_lazy_exports():
    from dsv.engine.sampling import SamplingParams as Inner
    from dsv.llm import LLM as Inner2

    assert dsv.SamplingParams is Inner and dsv.LLM is Inner2
    with pytest.raises(AttributeError):
        _ = dsv.NoSuchThing


def test_generate_with_prompt_token_ids_matches_single_request_loop():
    model = tiny_model()
    llm = LLM(model, max_total_tokens=1024, page_size=16, log_stats=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=list(PROMPTS.values()), sampling_params=params)
    assert [o.prompt_token_ids for o in outs] == list(PROMPTS.values())
    for o, p in zip(outs, PROMPTS.values()):
        assert o.finished and o.outputs[0].token_ids == alone_single(model, p, params)
        assert o.outputs[0].text == ""  # no tokenizer given
    assert_no_leaks(llm.engine)


def test_per_prompt_params_and_n():
    llm = LLM(tiny_model(), max_total_tokens=1024, page_size=16, log_stats=False)
    ids = list(PROMPTS.values())[:2]
    params = [
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=3, ignore_eos=True),
    ]
    a, b = llm.generate(prompt_token_ids=ids, sampling_params=params)
    assert len(a.outputs) == 1 and len(a.outputs[0].token_ids) == 2
    assert [len(c.token_ids) for c in b.outputs] == [3, 3]
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(prompt_token_ids=ids, sampling_params=params[:1])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text needs a tokenizer"])
    assert_no_leaks(llm.engine)


@pytest.mark.slow
def test_default_model_text_prompts():
    llm = LLM(model=None, device="cpu", max_total_tokens=2048, log_stats=False)
    assert llm.engine.model.dtype == torch.bfloat16  # "auto": the checkpoint's dtype
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(["Hello, world", "DeepSeek"], params)
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 5 and c.finish_reason == "length"
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert o.prompt_token_ids[0] == llm.tokenizer.bos_token_id
    again = llm.generate(["Hello, world"], params)[0]
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids  # greedy is deterministic
    assert_no_leaks(llm.engine)


def test_bench_offline_command(capsys):
    """``dsv bench offline`` (the module behind it; the lead registers it in server/cli.py)."""
    import argparse
    import json

    from dsv.server import cmd_bench

    parser = argparse.ArgumentParser()
    cmd_bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "offline",
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "2",
            "--warmup",
            "0",
            "--max-total-tokens",
            "1024",
            "--json",
        ]
    )
    assert cmd_bench.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_prompts"] == 3 and result["output_tokens_per_s"] > 0
    assert {"requests_per_s", "input_tokens_per_s", "output_tokens_per_s"} <= set(result)
