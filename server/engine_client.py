"""The asyncio side of the engine: one background thread steps the engine, coroutines await its outputs.

:class:`AsyncEngine` owns the engine thread (``wait_for_work`` + ``step()``) and forwards every
:class:`RequestOutput` delta into the asyncio queue of its request with ``loop.call_soon_threadsafe``.
:meth:`AsyncEngine.submit` validates and queues requests synchronously (so bad input is an HTTP error
before any response starts) and returns a :class:`RequestStream`; closing a stream before its requests
finish aborts them, which frees their KV pages at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dsv.engine.llm_engine import EngineStats, LLMEngine
from dsv.engine.outputs import RequestOutput
from dsv.engine.sampling import SamplingParams
from dsv.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine is not started, is shutting down, or has died (HTTP 503)."""


class QueueFull(RuntimeError):
    """Too many requests in flight (HTTP 429)."""


@dataclass
class _Track:
    """Latency bookkeeping of one engine request, on the event loop."""

    start: float
    prompt_tokens: int
    last: float | None = None


class RequestStream:
    """Outputs of one or more engine requests sharing a queue, in arrival order.

    Iterate it (``async for out in stream``) until it ends, then or on any early exit ``await
    stream.aclose()``: requests that have not finished are aborted.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue) -> None:
        self._engine = engine
        self._queue = queue
        self.pending = set(request_ids)
        self.request_ids = list(request_ids)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.pending:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.pending.clear()
            raise EngineUnavailable(f"the engine failed: {item}") from item
        if item.finished:
            self.pending.discard(item.request_id)
        return item

    async def aclose(self) -> None:
        """Abort whatever has not finished and stop routing outputs here (idempotent)."""
        for rid in self.request_ids:
            if rid in self.pending:
                self._engine.abort(rid)
            self._engine._release(rid)
        self.pending.clear()


class AsyncEngine:
    """Bridge between an :class:`LLMEngine` (stepped on its own thread) and asyncio request handlers.

    Args:
        engine: the engine; this object becomes the only caller of its ``step()``.
        max_pending: most engine requests in flight (running + queued); more get :class:`QueueFull`.
        metrics: optional Prometheus hooks.
    """

    def __init__(self, engine: LLMEngine, max_pending: int = 4096, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        self._queues: dict[str, asyncio.Queue] = {}
        self._tracks: dict[str, _Track] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.draining = False
        self.error: BaseException | None = None
        self._counter = 0

    # ----- lifecycle -----
    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self.draining and self.error is None

    async def start(self) -> None:
        """Start the engine thread, bound to the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dsv-engine", daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        """Refuse new requests (503) from now on; safe to call from a signal handler."""
        self.draining = True

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Abort every request still in flight and stop the engine thread."""
        self.draining = True
        for rid in list(self._queues):
            self.engine.abort(rid)
        # Give the engine a step to apply the aborts (frees pages) before the thread stops.
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() and time.monotonic() < deadline and self._thread_alive():
            await asyncio.sleep(0.01)
        self._stop.set()
        self.engine._wakeup.set()  # wake wait_for_work at once instead of after its timeout
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.wait_for_work(timeout=0.1):
                    continue
                outputs = self.engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, time.monotonic())
        except BaseException as exc:  # a dead engine must fail its requests, not hang them
            log.exception("engine loop died")
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    # ----- event-loop side -----
    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue  # closed by its consumer (abort echo) or unknown
            self._observe(out, now)
            queue.put_nowait(out)

    def _observe(self, out: RequestOutput, now: float) -> None:
        track = self._tracks.get(out.request_id)
        if self.metrics is None or track is None:
            return
        new = sum(len(c.token_ids) for c in out.outputs)
        if new:
            self.metrics.generation_tokens.inc(new)
            if track.last is None:
                self.metrics.ttft.observe(now - track.start)
            else:
                gap = (now - track.last) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap)
            track.last = now
        if out.finished:
            reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
            self.metrics.on_finish(reasons[0] if reasons else "stop", track.prompt_tokens, now - track.start)
            self._tracks.pop(out.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(exc)

    def _release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._tracks.pop(request_id, None)

    def new_request_id(self, prefix: str = "req") -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}-{time.monotonic_ns():x}"

    def submit(self, requests: list[tuple[str, list[int], SamplingParams, str | None]]) -> RequestStream:
        """Queue ``(request_id, prompt_token_ids, params, prompt)`` requests; all or none are added.

        Raises:
            EngineUnavailable: not ready or shutting down.
            QueueFull: ``max_pending`` would be exceeded.
            ValueError: the engine refused a request (bad ids, too long, ...).
        """
        if not self.ready:
            if self.metrics:
                self.metrics.on_reject("unavailable")
            raise EngineUnavailable(
                "the server is shutting down" if self.draining else "the engine is not ready"
            )
        if len(self._queues) + len(requests) > self.max_pending:
            if self.metrics:
                self.metrics.on_reject("queue_full")
            raise QueueFull(
                f"too many requests in flight ({len(self._queues)}, limit {self.max_pending}); retry later"
            )
        queue: asyncio.Queue = asyncio.Queue()
        added: list[str] = []
        try:
            for rid, ids, params, prompt in requests:
                if rid in self._queues:
                    raise ValueError(f"request id {rid!r} is already in use")
                self._queues[rid] = queue
                self._tracks[rid] = _Track(time.monotonic(), len(ids))
                added.append(rid)
                self.engine.add_request(rid, ids, params, prompt)
        except Exception:
            for rid in added:
                self.engine.abort(rid)
                self._release(rid)
            raise
        return RequestStream(self, added, queue)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def flush_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len
