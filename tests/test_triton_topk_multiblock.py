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
    for topk in (16, 64, 700):
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


def _layout_group_max(logits: torch.Tensor, visible: list[int], iters: int, block: int) -> list[torch.Tensor]:
    """Per row, the group maxima the logits kernel must write (topk_multiblock.group_layout, stated in torch):
    lane j's maximum over each run of ``sub`` blocks of every ``iters``-block chunk, ``sub`` from the row's
    own visible length."""
    from dsv.kernels.triton.topk_multiblock import GROUP_BLOCKS

    rows = []
    for t, n in enumerate(visible):
        sub = min(max(n // (GROUP_BLOCKS * block), 1), iters)
        runs, chunks = -(-iters // sub), -(-n // (iters * block))
        row = torch.full((chunks * iters * block,), float("-inf"))
        row[:n] = logits[t, :n]
        blocks = row.view(chunks, iters, block)
        rows.append(
            torch.stack([blocks[:, r * sub : (r + 1) * sub].amax(1) for r in range(runs)], dim=1).reshape(-1)
        )
    return rows


@pytest.mark.parametrize(
    ("spans", "iters"),
    [
        (None, 2),  # short rows: one block per group
        (
            [(0, 1), (1599, 1), (299, 1), (40, 1), (2199, 1)],
            4,
        ),  # mixed lengths: 1, 3 or 4 (= iters) blocks per group
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
    visible = [min(p + 1, meta.max_seq_len) for p in meta.positions.tolist()]
    for t, want in enumerate(_layout_group_max(logits.cpu(), visible, iters, 16)):
        assert torch.equal(gmax.cpu()[t, : want.numel()], want), f"row {t}"
        if visible[t] >= 8 * 16:  # about 32 x 16 groups per row whatever its length (>= k for k = 128)
            assert int(torch.isfinite(want).sum()) >= min(visible[t], 128)
    for topk in (8, 64, 128, 256):
        want = ref.indexer_topk(q, w, cache, meta, topk)
        got = indexer_topk(q.to(DEVICE), w.to(DEVICE), dev, dmeta, topk, topk_impl="multiblock")
        ti._check_topk(
            got, want, want_logits, meta.positions, 5e-4 if DEVICE == "cuda" else 1e-5
        )  # FP8 wgmma


def test_group_width_covers_every_row_length() -> None:
    from dsv.kernels.triton.topk_multiblock import GROUP_BLOCKS, group_width

    for iters, block in ((2, 16), (4, 16), (24, 128), (32, 128)):
        for length in (1, 15, 700, 5000, 70000):
            width = group_width(length, iters, block)
            most = 0
            for n in range(1, length + 1, max(1, length // 997)):
                sub = min(max(n // (GROUP_BLOCKS * block), 1), iters)
                most = max(most, -(-n // (iters * block)) * -(-iters // sub) * block)
            assert (
                most <= width <= max(4 * GROUP_BLOCKS * block, -(-length // (iters * block)) * iters * block)
            )


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
