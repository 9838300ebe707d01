"""The CPU int8 screen of the greedy head: exact fp32 argmax, whatever the rows look like."""

from __future__ import annotations

import pytest
import torch

from dsv.engine.greedy import exact_greedy
from dsv.engine.int8_screen import Int8Screen


def _argmax(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (hidden.float() @ w.float().T).argmax(-1)


@pytest.mark.parametrize("seed", range(4))
def test_screen_gives_the_fp32_argmax_on_random_heads(seed):
    g = torch.Generator().manual_seed(seed)
    vocab, k = 4096 + 128 * seed, 64 + 32 * seed
    w = (torch.randn(vocab, k, generator=g) * 0.05).to(torch.bfloat16)
    w[5] *= 40  # an outlier row widens the per-tensor int8 step: the bound must still hold
    hidden = (torch.randn(64, k, generator=g) * torch.rand(64, 1, generator=g) * 4).to(torch.bfloat16)
    hidden[::7, 0] *= 50  # outlier activations
    screen = Int8Screen.build(w)
    assert screen is not None and screen.chunk == 128
    assert torch.equal(exact_greedy(hidden, w, screen=screen), _argmax(hidden, w))


def test_screen_candidates_are_few_and_contain_the_winner():
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(8192, 128, generator=g) * 0.05).to(torch.bfloat16)
    hidden = torch.randn(32, 128, generator=g).to(torch.bfloat16)
    screen = Int8Screen.build(w)
    picked = screen.candidates(hidden)
    assert bool(picked.inside.all())
    want = _argmax(hidden, w)
    for r in range(32):
        cols = picked.cols[picked.rows == r]
        assert int(want[r]) in cols.tolist() and 1 <= cols.numel() <= 64


@pytest.mark.parametrize("tied", [2, 40])
def test_screen_with_exact_and_near_ties(tied):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(512, 64, generator=g) * 0.1).to(torch.bfloat16)
    w[100 : 100 + tied] = w[50]  # exact ties with token 50: the lowest id wins
    w[300] = w[50]
    w[300, 0] += 2**-6 * w[50, 0].abs().clamp_min(1e-2)
    hidden = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    hidden[:8] = w[50]
    screen = Int8Screen.build(w)
    assert torch.equal(exact_greedy(hidden, w, screen=screen), _argmax(hidden, w))


def test_screen_sends_flat_and_non_finite_rows_to_the_full_scan():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(384, 32, generator=g) * 0.1).to(torch.bfloat16)
    hidden = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    hidden[1] = 0.0
    hidden[2, 3] = float("nan")
    hidden[3, 5] = float("inf")
    screen = Int8Screen.build(w)
    picked = screen.candidates(hidden)
    assert picked.inside.tolist() == [True, False, False, False]
    got = exact_greedy(hidden, w, screen=screen, weight_fp32=w.float())
    assert torch.equal(got, _argmax(hidden, w)) and int(got.max()) < 384


def test_screen_declines_what_it_cannot_bound():
    w = torch.zeros(256, 16, dtype=torch.bfloat16)
    assert Int8Screen.build(w) is None  # all zero: no scale
    w[3, 2] = float("inf")
    assert Int8Screen.build(w) is None
    odd = torch.randn(300, 16).to(torch.bfloat16)  # vocabulary not a multiple of 128: smaller chunks
    screen = Int8Screen.build(odd)
    hidden = torch.randn(5, 16).to(torch.bfloat16)
    assert screen.chunk == 4 and torch.equal(exact_greedy(hidden, odd, screen=screen), _argmax(hidden, odd))
