"""The multi-program filtered top-k against an exact selection (ties to the lowest positions), and through the
indexer with ``topk_impl="multiblock"`` against the reference op. Tiny shapes: the CPU runs the interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import triton_test_device

DEVICE = triton_test_device()

from dsv.kernels.triton.topk import topk_indices  # noqa: E402
from dsv.kernels.triton.topk_multiblock import topk_indices_filtered  # noqa: E402


def _exact(x: torch.Tensor, topk: int) -> list[set[int]]:
    """Per row: the positions of the ``topk`` largest finite values, ties broken towards lower positions."""
    rows = []
    for r in x:
        pos = torch.arange(r.numel())
        finite = ~torch.isneginf(r)
        # Sort by value descending, then by position ascending (a stable sort of the position-ordered row).
        order = torch.sort(-r[finite], stable=True).indices
        rows.append(set(pos[finite][order][:topk].tolist()))
    return rows


def _strided_group_max(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the logits kernel emits for ``iters`` blocks of ``block`` keys: lane maxima over each chunk."""
    t, n = x.shape
    iters = 3
    span = block * iters
    pad = -(-n // span) * span
    xp = torch.full((t, pad), float("-inf"))
    xp[:, :n] = x
    return xp.view(t, pad // span, iters, block).amax(2).reshape(t, -1)


def _rows(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, length, generator=gen)
    x[0] = torch.randint(0, 4, (length,), generator=gen).float()  # heavy ties at the threshold
    x[1, 50:90] += 10.0  # a run of high neighbours (what strided groups are for)
    x[2, : length // 2] = -x[2, : length // 2].abs() * 1e30  # negative and huge
    x[4, ::3] = float("-inf")  # holes
    lengths = torch.tensor([length, length, length - 7, 0, length - 1, 20])
    for t, n in enumerate(lengths.tolist()):
        x[t, n:] = float("-inf")
    return x, lengths


@pytest.mark.parametrize("cap", [None, 40])  # 40: most lists overflow and the select reads the whole row
def test_filtered_topk_is_exact_and_deterministic(cap: int | None) -> None:
    x, lengths = _rows(600)
    for topk in (16, 64, 256, 700):  # 256: more than the 200 strided groups, so rows are read whole
        for gmax in (_strided_group_max(x, 8), x.view(6, 150, 4).amax(2)):  # strided and contiguous groups
            got = topk_indices_filtered(
                x.to(DEVICE), lengths.to(DEVICE), gmax.to(DEVICE), topk, cap=cap, chunk=128, block=256
            ).cpu()
            want = _exact(x, topk)
            assert got.dtype == torch.int32 and got.shape == (6, topk)
            for t in range(6):
                g = got[t][got[t] >= 0].tolist()
                assert len(g) == len(set(g)) and set(g) == want[t], f"row {t}, topk {topk}"
                assert (got[t][len(g) :] == -1).all(), "padding must follow the selection"
            again = topk_indices_filtered(
                x.to(DEVICE), lengths.to(DEVICE), gmax.to(DEVICE), topk, cap=cap, chunk=128, block=256
            ).cpu()
            assert torch.equal(got, again)


def test_radix_topk_ties_go_to_lower_positions() -> None:
    """The one-program select makes the same tie choice the filtered one is checked against."""
    x, lengths = _rows(600)
    got = topk_indices(x.to(DEVICE), lengths.to(DEVICE), 64, block=256).cpu()
    for t, want in enumerate(_exact(x, 64)):
        assert set(got[t][got[t] >= 0].tolist()) == want


@pytest.mark.parametrize(
    ("spans", "iters"),
    [
        (None, 2),
        # A decode batch of mixed lengths: groups sized for the 2200-key row leave the 41- and 300-key rows
        # fewer than k of them (their threshold then comes from their own scores).
        ([(0, 1), (1599, 1), (299, 1), (40, 1), (2199, 1)], 4),
    ],
)
def test_indexer_multiblock_matches_reference(spans: list[tuple[int, int]] | None, iters: int) -> None:
    from dsv.kernels.triton.indexer import indexer_logits, indexer_topk
    from dsv.ops import indexer as ref
    from tests import test_triton_indexer as ti

    meta, cache, dev = ti._batch(16, True, spans=spans or ti.SPANS)
    q, w = ti._query(meta, True, "fp8")
    dmeta = meta.to(DEVICE)
    logits, gmax = indexer_logits(
        q.to(DEVICE), w.to(DEVICE), dev, dmeta, group_max=True, block_s=16, iters=iters
    )
    want_logits = ref.indexer_logits(q, w, cache, meta)
    # Each lane's maximum over its chunk's blocks: 16 lanes per chunk of `iters` 16-key blocks.
    rows, span = want_logits.shape[0], 16 * iters
    pad = -(-want_logits.shape[1] // span) * span
    full = torch.full((rows, pad), float("-inf"))
    full[:, : want_logits.shape[1]] = logits.cpu()
    assert torch.equal(gmax.cpu(), full.view(rows, -1, iters, 16).amax(2).reshape(rows, -1))
    for topk in (8, 64, 128, 256):
        want = ref.indexer_topk(q, w, cache, meta, topk)
        got = indexer_topk(q.to(DEVICE), w.to(DEVICE), dev, dmeta, topk, topk_impl="multiblock")
        ti._check_topk(
            got, want, want_logits, meta.positions, 5e-4 if DEVICE == "cuda" else 1e-5
        )  # FP8 wgmma


def test_auto_takes_multiblock_for_long_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv.kernels.triton import indexer as tri
    from dsv.ops import indexer as ref
    from tests.test_triton_indexer import _batch, _check_topk, _query

    monkeypatch.setattr(tri, "_RADIX_MAX_LEN", 16)  # every row of the tiny batch counts as long
    meta, cache, dev = _batch(16, True)
    q, w = _query(meta, True, torch.float32)
    got = tri.indexer_topk(q.to(DEVICE), w.to(DEVICE), dev, meta.to(DEVICE), 32)
    _check_topk(
        got, ref.indexer_topk(q, w, cache, meta, 32), ref.indexer_logits(q, w, cache, meta), meta.positions
    )
