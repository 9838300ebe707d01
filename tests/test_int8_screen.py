"""The CPU int8 screen of the greedy head: the exact fp32 argmax, for outliers, ties, flat and non-finite rows."""

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
    screen = Int8Screen.build(w, check_speed=False)
    assert screen is not None and screen.chunk == 128
    assert torch.equal(exact_greedy(hidden, w, screen=screen), _argmax(hidden, w))


def test_screen_candidates_are_few_and_contain_the_winner():
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(8192, 128, generator=g) * 0.05).to(torch.bfloat16)
    hidden = torch.randn(32, 128, generator=g).to(torch.bfloat16)
    screen = Int8Screen.build(w, check_speed=False)
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
    screen = Int8Screen.build(w, check_speed=False)
    assert torch.equal(exact_greedy(hidden, w, screen=screen), _argmax(hidden, w))


def test_screen_sends_flat_and_non_finite_rows_to_the_full_scan():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(384, 32, generator=g) * 0.1).to(torch.bfloat16)
    hidden = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    hidden[1] = 0.0
    hidden[2, 3] = float("nan")
    hidden[3, 5] = float("inf")
    screen = Int8Screen.build(w, check_speed=False)
    picked = screen.candidates(hidden)
    assert picked.inside.tolist() == [True, False, False, False]
    got = exact_greedy(hidden, w, screen=screen, weight_fp32=w.float())
    assert torch.equal(got, _argmax(hidden, w)) and int(got.max()) < 384


def test_screen_declines_what_it_cannot_bound():
    w = torch.zeros(256, 16, dtype=torch.bfloat16)
    assert Int8Screen.build(w, check_speed=False) is None  # all zero: no scale
    w[3, 2] = float("inf")
    assert Int8Screen.build(w, check_speed=False) is None
    odd = torch.randn(300, 16).to(torch.bfloat16)  # vocabulary not a multiple of 128: smaller chunks
    screen = Int8Screen.build(odd, check_speed=False)
    hidden = torch.randn(5, 16).to(torch.bfloat16)
    assert screen.chunk == 4 and torch.equal(exact_greedy(hidden, odd, screen=screen), _argmax(hidden, odd))


def test_screen_bound_covers_fp32_rounding_in_the_subnormal_range():
    """Scores of a few 2^-150 units: fp32 products round to subnormals (absolute error 2^-150 each), which a
    relative rounding bound alone does not cover. Token 2's fp32 score is the largest though its exact one is
    not; the answer must be the fp32 argmax."""
    k, u = 66, 2.0**-75
    h = torch.zeros(1, k)
    h[0, 0], h[0, 2:] = 127, 1
    w = torch.zeros(4, k)
    w[0, 1] = 127
    w[1, 2:] = 5
    w[2, 2:] = 3
    w[2, 2:17] = 7
    h, w = (h * u).to(torch.bfloat16), (w * u).to(torch.bfloat16)
    want = (h.float()[:, None, :] * w.float()[None]).sum(-1).argmax(-1)
    screen = Int8Screen(w, (torch.round(w.double() / u) ).to(torch.int8).t(), u, 0.0,
                        float(w.double().norm(dim=1).max()), 127 * u, 1)  # fmt: skip
    assert int(want) == 2 and torch.equal(exact_greedy(h, w, screen=screen), want)


def test_screen_is_dropped_where_int8_is_not_faster(monkeypatch):
    """On a CPU whose int8 GEMM is slower than the weight's own (no VNNI), the runner keeps the bf16 pass."""
    import dsv.engine.int8_screen as screen_mod

    w = torch.randn(512, 64).to(torch.bfloat16)
    monkeypatch.setattr(screen_mod, "_int8_is_faster", lambda weight, q, packed: False)
    assert Int8Screen.build(w) is None
    timed = []
    monkeypatch.setattr(screen_mod, "_int8_is_faster", lambda weight, q, packed: timed.append(packed) or True)
    screen = Int8Screen.build(w)
    # The speed check times the path the screen runs: the prepacked GEMM where oneDNN has it.
    assert screen is not None and timed == [screen.packed is not None]


def test_prepacked_int8_gemm_gives_the_same_integers_as_int_mm():
    """oneDNN's prepacked path (fp32 output) holds the exact dot products for K <= 1040; past that (V3.2's
    7168) the screen keeps torch._int_mm's int32."""
    from dsv.engine.int8_screen import _prepack

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3000, 256, generator=g) * 0.05).to(torch.bfloat16)
    screen = Int8Screen.build(w, check_speed=False)
    if not hasattr(torch.ops.onednn, "qlinear_prepack"):
        pytest.skip("this torch has no oneDNN int8 linear")
    assert screen.packed is not None
    hq = torch.randint(-127, 128, (37, 256), generator=g, dtype=torch.int8)
    hq[0] = 127  # the largest |dot| the bound allows
    assert torch.equal(screen.int_dots(hq), torch._int_mm(hq, screen.weight_t).float())
    assert _prepack(torch.zeros(4, 1100, dtype=torch.int8)) is None
