"""The decode graph runner's bucketing, padding and eager fallbacks, on the CPU.

``eager_graph`` stands in for CUDA-graph capture: "replay" reruns the forward on the runner's static
buffers, so these tests see exactly the inputs a captured graph would read. Real capture is exercised by
backends/cuda/scripts/h200_check.py on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dsv.engine.batch import SeqChunk, build_metadata
from dsv.ops.metadata import AttentionMetadata

pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda.graphs import DecodeGraphRunner, capture_contexts, capture_sizes, eager_graph  # noqa: E402

PAGE = 4


def test_capture_sizes():
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert capture_sizes(1) == [1]
    assert capture_sizes(8, [16, 3, 1, 8, 3]) == [1, 3, 8]
    with pytest.raises(ValueError):
        capture_sizes(2, [4, 8])


class FakeForward:
    """Records what each call saw; the output mixes every metadata field so that errors show up."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.seen.append(
            {
                "bs": ids.shape[0],
                "ids": ids.clone(),
                "positions": meta.positions.clone(),
                "seq_lens": meta.seq_lens.clone(),
                "slots": meta.slot_mapping.clone(),
                "table": meta.block_table.clone(),
                "max_seq_len": meta.max_seq_len,
            }
        )
        seq = meta.token_seq  # per-sequence fields gathered per token
        table_sum = meta.block_table.long().sum(-1)[seq]
        cols = [ids, meta.positions, meta.seq_lens[seq], meta.slot_mapping, table_sum, seq]
        return torch.stack([c.float() for c in cols], dim=-1)


def decode_step(lengths: list[int], first_page: int = 1) -> tuple[torch.Tensor, AttentionMetadata]:
    """One decode token per sequence; sequence b has ``lengths[b]`` keys after this step."""
    chunks, page = [], first_page
    for n in lengths:
        pages = list(range(page, page + -(-n // PAGE)))
        page += len(pages)
        chunks.append(SeqChunk(n - 1, 1, pages))
    meta = build_metadata(chunks, PAGE)
    return torch.arange(100, 100 + len(lengths)), meta


def runner(fwd, **kw) -> DecodeGraphRunner:
    r = DecodeGraphRunner(
        fwd, max_batch_size=8, max_seq_len=32, page_size=PAGE, device="cpu", graph_factory=eager_graph, **kw
    )
    r.capture()
    return r


def test_replays_the_smallest_graph_that_fits_and_pads():
    fwd = FakeForward()
    r = runner(fwd, batch_sizes=[1, 2, 4, 8])
    assert sorted(r.graphs) == [(1, 32), (2, 32), (4, 32), (8, 32)]  # default buckets exceed 32
    fwd.seen.clear()
    ids, meta = decode_step([5, 9, 13])
    out = r(ids, meta)
    assert r.stats == {"replayed": 1, "eager": 0}
    seen = fwd.seen[-1]
    assert seen["bs"] == 4 and seen["max_seq_len"] == 32  # padded to 4, context frozen at capture
    assert seen["ids"].tolist() == [100, 101, 102, 0]
    assert seen["positions"].tolist() == [4, 8, 12, 0] and seen["seq_lens"].tolist() == [5, 9, 13, 1]
    assert seen["slots"][3] == 0 and seen["table"].shape == (4, 8) and seen["table"][3].eq(0).all()
    torch.testing.assert_close(out, FakeForward()(ids, meta))


def test_capture_contexts():
    assert capture_contexts(163840, 64) == [4096, 16384, 65536, 163840]
    assert capture_contexts(32, 4, [10, 8, 64]) == [8, 12, 32]  # rounded up to whole pages, then the maximum
    assert capture_contexts(4096, 64) == [4096]


def test_short_contexts_replay_a_graph_frozen_at_a_smaller_context():
    """A step replays the smallest context bucket holding its longest sequence, so kernels sized by the frozen
    max_seq_len (the indexer's logits and top-k) do not pay for the maximum context."""
    fwd = FakeForward()
    r = runner(fwd, batch_sizes=[2, 4], context_buckets=[8, 16])
    assert sorted(r.graphs) == [(2, 8), (2, 16), (2, 32), (4, 8), (4, 16), (4, 32)]
    for lengths, frozen in (([5, 9, 13], 16), ([3, 7], 8), ([8], 8), ([9, 30], 32)):
        ids, meta = decode_step(lengths)
        out = r(ids, meta)
        seen = fwd.seen[-1]
        assert seen["max_seq_len"] == frozen and seen["table"].shape[1] == frozen // PAGE
        torch.testing.assert_close(out, FakeForward()(ids, meta))
    assert r.stats == {"replayed": 4, "eager": 0}


def test_stale_block_table_columns_are_cleared():
    fwd = FakeForward()
    r = runner(fwd, batch_sizes=[2])
    r(*decode_step([30, 30]))  # 8 pages each
    ids, meta = decode_step([3])  # 1 page: columns 1..7 must not keep the last step's pages
    out = r(ids, meta)
    assert fwd.seen[-1]["table"][0, 1:].eq(0).all() and fwd.seen[-1]["table"][1].eq(0).all()
    torch.testing.assert_close(out, FakeForward()(ids, meta))


def test_steps_a_graph_cannot_take_run_eagerly():
    fwd = FakeForward()
    r = runner(fwd, batch_sizes=[1, 2, 4])
    prefill = build_metadata([SeqChunk(0, 3, [1])], PAGE)
    r(torch.arange(3), prefill)
    assert r.why_eager(torch.arange(3), prefill).startswith("not a pure decode step")
    r(*decode_step([2] * 5))  # more sequences than the largest graph
    r(*decode_step([40]))  # longer than the captured context
    assert r.stats == {"replayed": 0, "eager": 3}
    assert fwd.seen[-1]["bs"] == 1 and fwd.seen[-1]["max_seq_len"] == 40


def test_disabled_runner_captures_nothing():
    fwd = FakeForward()
    r = runner(fwd, enabled=False)
    assert r.graphs == {} and fwd.seen == []
    ids, meta = decode_step([3, 4])
    torch.testing.assert_close(r(ids, meta), FakeForward()(ids, meta))
    assert r.why_eager(ids, meta) == "CUDA graphs disabled"


def test_tiny_model_decode_through_the_runner_matches_eager():
    """Padding rows (page 0, slot 0) do not disturb the real rows of a real model's decode step."""
    from dsv.backend.reference import ReferenceBackend
    from dsv.engine.kv_pool import CacheSpec, KVPool
    from tests.model_factory import random_tiny_model, tiny_config

    cfg = tiny_config()
    model = random_tiny_model(cfg)
    spec = CacheSpec(page_size=PAGE, indexer_quant="fp8")
    pool = KVPool(cfg, spec, 32, model.dtype)
    ops = ReferenceBackend().ops()
    lengths = [6, 11, 3]
    pages = [pool.allocate(-(-(n + 1) // PAGE)) for n in lengths]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, p in zip(lengths, pages):
            model(
                torch.randint(0, cfg.vocab_size, (n,), generator=gen),
                build_metadata([SeqChunk(0, n, p)], PAGE),
                pool.layers,
                ops,
            )
        meta = build_metadata([SeqChunk(n, 1, p) for n, p in zip(lengths, pages)], PAGE)
        ids = torch.tensor([7, 8, 9])
        forward = lambda i, m: model(i, m, pool.layers, ops)  # noqa: E731
        eager = forward(ids, meta).clone()  # rewrites the same KV slots: the runner reproduces it
        r = DecodeGraphRunner(
            forward, max_batch_size=4, max_seq_len=24, page_size=PAGE, device="cpu", graph_factory=eager_graph
        )
        r.capture()
        out = r(ids, meta)
    assert r.stats["replayed"] == 1
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
