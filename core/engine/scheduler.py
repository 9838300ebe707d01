"""Continuous batching under a token budget, with chunked prefill, prefix reuse and preemption.

Each step (vLLM v1's unified scheme) every running sequence asks for the tokens it has not computed yet: one
for a decoding sequence, the rest of its prompt (up to the remaining budget) for a prefilling one. Running
sequences go first, in admission order; then waiting ones are admitted first come, first served while the
budget, ``max_running`` and the free KV pages allow. Admission stops at the first waiting request that does
not fit (no overtaking).

When a running sequence needs a page and none is free, the most recently admitted running sequence is
preempted: its full pages go to the prefix cache, its pages are freed, and it goes back to the front of the
waiting queue to be recomputed later (prompt and the output so far; usually a prefix-cache hit). The oldest
running sequence is never preempted, and a sequence that cannot fit the whole pool is refused at
``add_request``, so the engine always makes progress and never fails for lack of pages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsv.engine.block_manager import ROOT, BlockManager
from dsv.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at ``start`` are computed in this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Owns the waiting queue and the running list; the only place pages are handed to requests."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_running: int) -> None:
        self.bm = block_manager
        self.page_size = block_manager.page_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ----- scheduling -----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.bm.pages_for(req.num_computed_tokens + n) - len(req.pages)
            while need > self.bm.num_free and self.running[-1] is not req:
                out.preempted.append(self._preempt(self.running.pop()))
            if need > self.bm.num_free:  # req is the lowest-priority one left: it yields
                out.preempted.append(self._preempt(self.running.pop()))
                break
            req.pages += self.bm.allocate(need)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            i += 1
        # After a preemption nothing new is admitted: the pages are needed by the running ones.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            fresh = req.num_computed_tokens == 0
            if fresh:
                self._match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.bm.pages_for(req.num_computed_tokens + n) - len(req.pages)
            if need > self.bm.num_free:
                if fresh:  # give the matched pages back; the match is redone on the next try
                    self.bm.free(req.pages)
                    req.pages, req.page_nodes, req.num_computed_tokens = [], [], 0
                break
            self.waiting.popleft()
            if fresh:
                self._record_hit(req)
            req.pages += self.bm.allocate(need)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput) -> None:
        """The forward of ``out`` ran: its tokens have KV now; index the pages that became full."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens = chunk.start + chunk.num_tokens
            self._cache_full_pages(chunk.request)

    def finish(self, req: Request) -> None:
        """Release a finished request (its full pages stay in the prefix cache)."""
        self.running.remove(req)
        self._release(req)

    def abort(self, request_id: str) -> Request | None:
        """Remove a waiting or running request at once, freeing its pages. None if unknown or finished."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.abort()
        return req

    def flush_prefix_cache(self) -> int:
        """Forget every cached prefix; running requests keep their pages (they become private)."""
        for req in self.running:
            req.page_nodes = []
        return self.bm.flush()

    # ----- helpers -----
    def _match_prefix(self, req: Request) -> None:
        # At least one token must be computed, so a fully cached prompt still yields logits.
        pages, nodes = self.bm.match_prefix(req.all_token_ids, req.num_tokens - 1)
        req.pages, req.page_nodes = pages, nodes
        req.num_computed_tokens = len(pages) * self.page_size

    def _record_hit(self, req: Request) -> None:
        if not self.bm.enable_prefix_caching:
            return
        self.bm.stats.queried_tokens += req.num_tokens - 1
        self.bm.stats.hit_tokens += req.num_computed_tokens
        if req.metrics.num_preemptions == 0:
            req.metrics.num_cached_tokens = req.num_computed_tokens

    def _cache_full_pages(self, req: Request) -> None:
        if not self.bm.enable_prefix_caching:
            return
        ps = self.page_size
        tokens = req.all_token_ids
        for i in range(len(req.page_nodes), req.num_computed_tokens // ps):
            parent = req.page_nodes[-1] if req.page_nodes else ROOT
            req.page_nodes.append(self.bm.insert(parent, tokens[i * ps : (i + 1) * ps], req.pages[i]))

    def _preempt(self, req: Request) -> Request:
        self._cache_full_pages(req)
        self.bm.free(req.pages)
        req.reset_for_recompute()
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        return req

    def _release(self, req: Request) -> None:
        self._cache_full_pages(req)
        self.bm.free(req.pages)
        req.pages, req.page_nodes = [], []
        del self.requests[req.request_id]
