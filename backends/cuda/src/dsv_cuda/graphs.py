"""CUDA graphs for decode batches: capture the decode forward once per batch size, replay the smallest
graph that fits.

How it works: the runner owns static input buffers sized for the largest captured batch (input ids,
positions, token_seq, query_start_loc, seq_lens, block_table, slot_mapping). A decode step of ``bs``
sequences is copied into the first ``bs`` rows; rows up to the captured size are padding (token 0 at
position 0 of a one-token sequence whose page table points at page 0, KV written to ``pad_slot``); the
graph is replayed and the first ``bs`` output rows returned.

Constraints (why some forwards cannot be captured):

- Everything the forward derives from Python values is frozen at capture: the batch size, ``page_size``,
  ``max_query_len`` (1) and ``meta.max_seq_len``. Kernels take each sequence's length from ``seq_lens`` (a
  tensor) and treat positions past it as invisible, but their work can still grow with the frozen
  ``max_seq_len`` (the indexer scores [T, max_seq_len] logits and selects over them). So graphs are captured
  per batch size *and* per context bucket (:data:`DEFAULT_CONTEXT_BUCKETS` below the maximum context, plus
  the maximum itself), and a step replays the smallest bucket holding its longest sequence; a step past the
  maximum runs eagerly.
- No host synchronization in the decode forward: no ``.tolist()``, ``.item()``, ``nonzero``, ``unique`` or
  data-dependent shapes. The reference ``fused_moe`` (``core/ops/moe.py``: ``torch.bincount(...).tolist()``)
  and the deep_gemm ``fused_moe`` (padded row count) do this, so MoE models
  need a capturable fused_moe kernel (e.g. the Triton one) for graphs; attention, indexer, KV writes and
  linears of this backend are capturable.
- Padding rows write their KV to ``pad_slot`` (default 0: page 0, which ``KVPool`` never hands out).
- The returned tensor is a view of the graph's static output: consume it before the next replay.

The engine builds the runner through ``CudaBackend.decode_runner`` (:func:`capture_decode`) when
``--disable-cuda-graph`` is not given; ``enabled=False`` runs every step eagerly.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dsv.backend.interface import DecodeGraphConfig, KernelUnavailable
from dsv.ops.metadata import AttentionMetadata

log = logging.getLogger(__name__)

#: Batch sizes captured by default (those up to ``max_batch_size``, plus ``max_batch_size`` itself).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
#: Context lengths (frozen max_seq_len) captured below the maximum context: a decode step at 3K context must
#: not pay for the indexer's logits and top-k over, say, 160K positions.
DEFAULT_CONTEXT_BUCKETS = (4096, 16384, 65536)

ForwardFn = Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]
#: Given a zero-argument closure that runs the forward on the static buffers, return (replay, output).
GraphFactory = Callable[[Callable[[], torch.Tensor], torch.device], tuple[Callable[[], None], torch.Tensor]]


def capture_sizes(max_batch_size: int, sizes: Sequence[int] | None = None) -> list[int]:
    """Sorted batch sizes to capture: ``sizes`` (default :data:`DEFAULT_BATCH_SIZES`) up to
    ``max_batch_size``; with the defaults ``max_batch_size`` itself is always included."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    chosen = sorted({int(s) for s in (sizes or DEFAULT_BATCH_SIZES) if 0 < int(s) <= max_batch_size})
    if sizes is None and (not chosen or chosen[-1] != max_batch_size):
        chosen.append(max_batch_size)
    if not chosen:
        raise ValueError(f"no capture size in {list(sizes or [])} is <= max_batch_size {max_batch_size}")
    return chosen


def capture_contexts(max_seq_len: int, page_size: int, buckets: Sequence[int] | None = None) -> list[int]:
    """Sorted frozen context lengths to capture: ``buckets`` (default :data:`DEFAULT_CONTEXT_BUCKETS`)
    below ``max_seq_len``, rounded up to whole pages, plus ``max_seq_len`` itself."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    chosen = {-(-int(b) // page_size) * page_size for b in (buckets or DEFAULT_CONTEXT_BUCKETS) if int(b) > 0}
    return sorted({c for c in chosen if c < max_seq_len} | {max_seq_len})


def cuda_graph(
    fn: Callable[[], torch.Tensor], device: torch.device, pool=None
) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm ``fn`` up on a side stream (lazy inits, autotuning), then capture it into a CUDA graph."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def eager_graph(
    fn: Callable[[], torch.Tensor], device: torch.device
) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for :func:`cuda_graph` (tests on CPU): "replay" reruns ``fn`` on the static buffers and
    copies into the output captured first, exactly the data flow of a graph replay."""
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


class StaticBatch:
    """Static decode inputs for up to ``max_batch_size`` sequences (the graph reads these addresses)."""

    def __init__(
        self, max_batch_size: int, max_pages: int, page_size: int, max_seq_len: int, device, pad_slot: int
    ) -> None:
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.pad_slot = pad_slot
        n = max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.token_seq = torch.arange(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(n, max_pages, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), pad_slot, dtype=torch.int64, device=device)

    def meta(self, bs: int, context: int | None = None) -> AttentionMetadata:
        """Metadata of views over the first ``bs`` rows, frozen at ``context`` (default: the maximum) keys."""
        context = self.max_seq_len if context is None else context
        pages = -(-context // self.page_size)
        return AttentionMetadata(
            positions=self.positions[:bs],
            token_seq=self.token_seq[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs, :pages],
            slot_mapping=self.slot_mapping[:bs],
            page_size=self.page_size,
            max_seq_len=context,
            max_query_len=1,
        )

    def load(self, padded: int, input_ids: torch.Tensor, meta: AttentionMetadata) -> None:
        """Copy a decode step of ``bs`` sequences into rows [0, bs) and reset rows [bs, padded) to padding."""
        bs = meta.num_seqs
        pages = meta.block_table.shape[1]
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(meta.positions, non_blocking=True)
        self.seq_lens[:bs].copy_(meta.seq_lens, non_blocking=True)
        self.slot_mapping[:bs].copy_(meta.slot_mapping, non_blocking=True)
        self.block_table[:padded].zero_()  # stale columns of shorter tables must point at page 0
        self.block_table[:bs, :pages].copy_(meta.block_table, non_blocking=True)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.slot_mapping[bs:padded].fill_(self.pad_slot)


@dataclass
class _Graph:
    replay: Callable[[], None]
    output: torch.Tensor


class DecodeGraphRunner:
    """Runs decode steps through captured graphs; anything else (or ``enabled=False``) runs eagerly.

    Args:
        forward: ``forward(input_ids [T], meta) -> [T, ...]``, e.g. ``lambda ids, m: model(ids, m, caches, ops)``.
        max_batch_size: most sequences one decode step may hold (the scheduler's max running requests).
        max_seq_len: the longest context any sequence may reach (frozen into the graphs).
        page_size: KV page size of the pool.
        device: the CUDA device.
        batch_sizes: sizes to capture (default :data:`DEFAULT_BATCH_SIZES` up to ``max_batch_size``).
        context_buckets: frozen context lengths below ``max_seq_len`` (default :data:`DEFAULT_CONTEXT_BUCKETS`).
        enabled: False for ``--disable-cuda-graph``.
        pad_slot: KV slot padding rows write to (a slot no sequence owns).
        graph_factory: how to capture (:func:`eager_graph` in CPU tests).
    """

    def __init__(
        self,
        forward: ForwardFn,
        *,
        max_batch_size: int,
        max_seq_len: int,
        page_size: int,
        device: str | torch.device = "cuda",
        batch_sizes: Sequence[int] | None = None,
        context_buckets: Sequence[int] | None = None,
        enabled: bool = True,
        pad_slot: int = 0,
        graph_factory: GraphFactory | None = None,
    ) -> None:
        self.forward = forward
        self.enabled = enabled
        self.device = torch.device(device)
        self.sizes = capture_sizes(max_batch_size, batch_sizes)
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        self.max_pages = -(-max_seq_len // page_size)
        self.contexts = capture_contexts(max_seq_len, page_size, context_buckets)
        self.static = StaticBatch(
            self.sizes[-1], self.max_pages, page_size, max_seq_len, self.device, pad_slot
        )
        self.graphs: dict[tuple[int, int], _Graph] = {}  # (batch size, frozen context) -> graph
        self.stats = {"replayed": 0, "eager": 0}
        self.capture_s = 0.0
        self.note = ""  # extra words for describe(), e.g. kernels replaced for capture
        self._pool = None
        self._factory = graph_factory

    def capture(self) -> None:
        """Capture every (batch size, context bucket), largest first (smaller graphs reuse its memory pool).

        Raises:
            KernelUnavailable: a capture failed (typically a kernel that synchronizes with the host); the
                message says to run with ``--disable-cuda-graph``.
        """
        if not self.enabled:
            log.info("CUDA graphs disabled (--disable-cuda-graph): decode runs eagerly")
            return
        start = time.perf_counter()
        with torch.inference_mode():
            for bs, ctx in [(b, c) for b in reversed(self.sizes) for c in reversed(self.contexts)]:
                ids, meta = self.static.input_ids[:bs], self.static.meta(bs, ctx)
                fn = lambda ids=ids, meta=meta: self.forward(ids, meta)  # noqa: E731
                try:
                    if self._factory is not None:
                        replay, out = self._factory(fn, self.device)
                    else:
                        if self._pool is None:
                            self._pool = torch.cuda.graph_pool_handle()
                        replay, out = cuda_graph(fn, self.device, self._pool)
                except Exception as exc:
                    first = (str(exc).strip().splitlines() or [""])[0]
                    if isinstance(exc, torch.OutOfMemoryError):
                        why = "the GPU ran out of memory (lower --mem-fraction-static or --cuda-graph-max-bs)"
                    else:
                        why = "a kernel of the decode path may synchronize with the host or fail to build"
                    raise KernelUnavailable(
                        f"capturing the decode forward for batch size {bs} (context {ctx}) failed with "
                        f"{type(exc).__name__}: {first}; {why}. "
                        "Run with --disable-cuda-graph to decode eagerly"
                    ) from exc
                self.graphs[(bs, ctx)] = _Graph(replay, out)
        self.capture_s = time.perf_counter() - start
        log.info("%s", self.describe())

    def describe(self) -> str:
        """One line: what was captured (for the engine's start-up log)."""
        if not self.graphs:
            return "decode graphs: none captured (decode runs eagerly)"
        note = f"; {self.note}" if self.note else ""
        return (
            f"decode graphs: captured batch sizes {self.sizes} x contexts {self.contexts}, "
            f"({len(self.graphs)} graphs, "
            f"pad slot {self.static.pad_slot}) in {self.capture_s:.1f} s{note}"
        )

    def padded_size(self, bs: int) -> int | None:
        """The smallest captured batch size >= ``bs`` (None when ``bs`` is larger than all)."""
        i = bisect.bisect_left(self.sizes, bs)
        return self.sizes[i] if i < len(self.sizes) else None

    def context_bucket(self, max_seq_len: int) -> int | None:
        """The smallest captured context >= ``max_seq_len`` (None past the maximum)."""
        i = bisect.bisect_left(self.contexts, max_seq_len)
        return self.contexts[i] if i < len(self.contexts) else None

    def why_eager(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> str | None:
        """Why this step cannot replay a graph (None when it can)."""
        if not self.enabled:
            return "CUDA graphs disabled"
        if not self.graphs:
            return "no graph captured"
        if not meta.is_decode or meta.num_tokens != meta.num_seqs or input_ids.shape[0] != meta.num_tokens:
            return "not a pure decode step (one token per sequence)"
        if self.padded_size(meta.num_seqs) is None:
            return f"batch of {meta.num_seqs} exceeds the largest captured size {self.sizes[-1]}"
        if meta.page_size != self.page_size:
            return f"page size {meta.page_size} differs from the captured {self.page_size}"
        if meta.max_seq_len > self.max_seq_len or meta.block_table.shape[1] > self.max_pages:
            return f"context {meta.max_seq_len} exceeds the captured max_seq_len {self.max_seq_len}"
        return None

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The forward's output for this step: through a graph when possible, else eagerly."""
        reason = self.why_eager(input_ids, meta)
        if reason is not None:
            self.stats["eager"] += 1
            return self.forward(input_ids, meta)
        bs = meta.num_seqs
        padded = self.padded_size(bs)
        self.static.load(padded, input_ids, meta)
        graph = self.graphs[(padded, self.context_bucket(meta.max_seq_len))]
        with torch.inference_mode():  # outputs were captured as inference tensors
            graph.replay()
        self.stats["replayed"] += 1
        return graph.output[:bs]


def capture_decode(
    forward: ForwardFn,
    config: DecodeGraphConfig,
    device: str | torch.device,
    graph_factory: GraphFactory | None = None,
    note: str = "",
) -> DecodeGraphRunner:
    """A :class:`DecodeGraphRunner` for the engine's :class:`DecodeGraphConfig`, already captured.

    The context buckets come from the config, else from ``DSV_CUDA_GRAPH_CONTEXT_BUCKETS`` (comma-separated
    lengths, e.g. ``2048,8192``), else :data:`DEFAULT_CONTEXT_BUCKETS`.
    """
    buckets = config.context_buckets
    env = os.environ.get("DSV_CUDA_GRAPH_CONTEXT_BUCKETS", "").strip()
    if buckets is None and env:
        try:
            buckets = tuple(int(b) for b in env.split(",") if b.strip())
        except ValueError as exc:
            raise ValueError(
                f"DSV_CUDA_GRAPH_CONTEXT_BUCKETS must be comma-separated integers, got {env!r}"
            ) from exc
    runner = DecodeGraphRunner(
        forward,
        max_batch_size=config.max_batch_size,
        max_seq_len=config.max_seq_len,
        page_size=config.page_size,
        device=device,
        batch_sizes=config.batch_sizes,
        context_buckets=buckets,
        pad_slot=config.pad_slot,
        graph_factory=graph_factory,
    )
    runner.note = note
    runner.capture()
    return runner
