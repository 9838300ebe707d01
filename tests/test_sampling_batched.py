"""The batched sampler against straightforward per-row definitions, and its randomness contract."""

from __future__ import annotations

import math

import pytest
import torch

from dsv.engine.sampler import Sampler, SampleRow, apply_penalties, apply_top_k, apply_top_p
from dsv.engine.sampling import SamplingParams

V = 50


def _row(prompt=(), output=(), gen=None, stop=(), **kw) -> SampleRow:
    return SampleRow(SamplingParams(**kw), list(prompt), list(output), gen, tuple(stop))


def test_params_validation_and_normalization():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]
    for bad in (
        {"temperature": -1},
        {"top_p": 0},
        {"min_p": 1.5},
        {"n": 0},
        {"repetition_penalty": 0},
        {"frequency_penalty": 3},
        {"top_k": -2},
        {"min_tokens": 5, "max_tokens": 4},
        {"logprobs": -1},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_greedy_rows_take_the_argmax_and_ignore_randomness():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    rows = [_row(temperature=0), _row(temperature=0.7, seed=1), _row(temperature=0), _row(temperature=0)]
    rows[1].generator = torch.Generator().manual_seed(1)
    tokens, _ = Sampler(V)(logits, rows)
    expected = logits.argmax(-1).tolist()
    assert tokens[0] == expected[0] and tokens[2:] == expected[2:]


def test_penalties_match_per_row_definition():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 3
    rows = [
        _row([1, 2, 3], [3, 3, 7], repetition_penalty=1.3),
        _row([4], [5, 5, 5, 9], frequency_penalty=0.5, presence_penalty=0.25),
        _row([6], [], repetition_penalty=0.8, presence_penalty=-0.5),
    ]
    got = apply_penalties(logits.clone(), rows)
    for i, r in enumerate(rows):
        want = logits[i].clone()
        p = r.params
        for t in set(r.prompt_token_ids) | set(r.output_token_ids):
            want[t] = want[t] / p.repetition_penalty if want[t] > 0 else want[t] * p.repetition_penalty
        for t in set(r.output_token_ids):
            want[t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
        torch.testing.assert_close(got[i], want)


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    k = apply_top_k(logits, [2, 0, 5])
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all()
    assert torch.isfinite(k[1:]).all()
    probs = torch.softmax(logits, -1)
    p = apply_top_p(probs, [0.6, 0.7, 1.0])
    assert (p[0] > 0).tolist() == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
    assert (p[1] > 0).tolist() == [True, True, False, False, False]  # 0.7 reached with two tokens
    assert (p[2] > 0).all()
    # min_p through the sampler: with min_p = 0.35 only tokens with p >= 0.175 may be drawn.
    rows = [_row(temperature=1.0, min_p=0.35)] * 200
    tokens, _ = Sampler(5, seed=3)(logits[:1].expand(200, -1), rows)
    assert set(tokens) <= {0, 1}


def test_sampling_distribution_matches_probabilities():
    """The exponential race draws from softmax(logits / T)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 4000
    logits = (probs.log() * 0.5).expand(n, -1)  # temperature 0.5 undoes the 0.5 factor
    tokens, _ = Sampler(4, seed=7)(logits, [_row(temperature=0.5)] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / n)


def test_seeded_rows_do_not_depend_on_the_batch():
    others = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    mine = torch.randn(1, V, generator=torch.Generator().manual_seed(3))

    def draw(rows_before: int) -> int:
        rows = [_row(temperature=1.0) for _ in range(rows_before)]
        rows.append(_row(temperature=1.0, gen=torch.Generator().manual_seed(42)))
        tokens, _ = Sampler(V, seed=rows_before)(torch.cat([others[:rows_before], mine]), rows)
        return tokens[-1]

    first = [draw(0) for _ in range(3)]
    assert len(set(first)) == 1 and draw(2) == first[0] and draw(4) == first[0]


def test_min_tokens_masks_stop_tokens():
    logits = torch.zeros(2, V)
    logits[:, 7] = 10.0
    rows = [
        _row([], [1], stop=(7,), temperature=0, min_tokens=2),
        _row([], [1, 2], stop=(7,), temperature=0, min_tokens=2),
    ]
    tokens, _ = Sampler(V)(logits, rows)
    assert tokens[0] != 7 and tokens[1] == 7


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    rows = [_row(temperature=0, logprobs=3), _row(temperature=0), _row(temperature=2.0, logprobs=0, seed=5)]
    rows[2].generator = torch.Generator().manual_seed(5)
    tokens, lps = Sampler(V)(logits, rows)
    ref = torch.log_softmax(logits, -1)
    assert lps[1] is None
    top = ref[0].topk(3)
    assert lps[0].top_ids == top.indices.tolist() and lps[0].rank == 1
    assert lps[0].top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert lps[2].top_ids == [] and lps[2].logprob == pytest.approx(ref[2, tokens[2]].item(), abs=1e-6)
    assert lps[2].rank == int((ref[2] > ref[2, tokens[2]]).sum()) + 1


def test_low_precision_greedy_head_is_the_fp32_argmax():
    """The bf16 head + fp32 re-scoring of candidates picks what argmax(model.logits) picks."""
    from dsv.backend.reference import ReferenceBackend
    from dsv.engine.kv_pool import CacheSpec, KVPool
    from dsv.engine.model_runner import ModelRunner
    from tests.model_factory import random_tiny_model, tiny_config

    model = random_tiny_model(tiny_config(), dtype=torch.bfloat16)
    runner = ModelRunner(model, ReferenceBackend().ops(), KVPool(model.cfg, CacheSpec(4), 4, model.dtype))
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(256, model.cfg.hidden_size, generator=g) * 3).to(torch.bfloat16)
    # Near ties: make some rows' top two logits differ by less than bf16 can resolve.
    w = model.lm_head.weight
    with torch.no_grad():
        w[7] = w[3]
        w[7, 0] = w[3, 0] + 2**-7 * w[3, 0].abs().clamp_min(1e-2)
    hidden[:16] = w[3].expand(16, -1)
    want = model.logits(hidden).argmax(-1)
    assert torch.equal(runner.greedy_tokens(hidden), want)


@pytest.mark.parametrize("tied", [2, 40])
def test_exact_greedy_with_few_and_many_near_ties(tied):
    """Near ties inside the top-k pass and more near ties than it holds (the full-scan branch) both give
    the fp32 argmax, lowest id first on exact ties."""
    from dsv.engine.greedy import exact_greedy

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(500, 64, generator=g) * 0.1).to(torch.bfloat16)
    w[100 : 100 + tied] = w[50]  # exact ties with token 50 for any hidden state
    w[300] = w[50]
    w[300, 0] += 2**-6 * w[50, 0].abs().clamp_min(1e-2)  # a near tie bf16 logits cannot resolve
    hidden = (torch.randn(16, 64, generator=g)).to(torch.bfloat16)
    hidden[:8] = w[50]
    want = (hidden.float() @ w.float().T).argmax(-1)
    assert torch.equal(exact_greedy(hidden, w), want)
    assert (want[:8] == 50).sum() + (want[:8] == 300).sum() == 8


def test_exact_greedy_flat_and_non_finite_rows_match_argmax():
    """A zero hidden state (every token ties), a NaN row and an inf weight fall back to the fp32 argmax: never
    the out-of-range id ``vocab``, never a vocabulary-sized candidate gather."""
    from dsv.engine.greedy import exact_greedy

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(300, 32, generator=g) * 0.1).to(torch.bfloat16)
    hidden = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    hidden[1] = 0.0
    hidden[2, 3] = float("nan")
    want = (hidden.float() @ w.float().T).argmax(-1)
    got = exact_greedy(hidden, w)
    assert torch.equal(got, want) and int(got.max()) < 300
    w_inf = w.clone()
    w_inf[7, 0] = float("inf")
    want = (hidden.float() @ w_inf.float().T).argmax(-1)
    assert torch.equal(exact_greedy(hidden, w_inf), want)
