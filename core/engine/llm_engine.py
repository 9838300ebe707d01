"""The serving engine: requests in, incremental outputs out.

Threading model (how a server drives it): one thread owns the engine and calls :meth:`LLMEngine.step` in a
loop; any thread may call :meth:`add_request`, :meth:`abort` and :meth:`reset_prefix_cache`. Those only
validate their arguments and enqueue a command, so they never block on a running forward; the commands take
effect, in order, at the start of the next ``step()``. A typical background loop::

    while running:
        engine.wait_for_work(timeout=0.1)          # sleeps while there is nothing to do
        for out in engine.step():                  # list[RequestOutput], deltas of this step
            loop.call_soon_threadsafe(queues[out.request_id].put_nowait, out)

Each :class:`RequestOutput` from ``step()`` holds only what is new since the previous one for that request:
new token ids, new text (never a broken UTF-8 character, stop strings cut), their logprobs, and the
finish reason once the completion ends ("stop", "length" or "abort"). An aborted request yields one final
output with ``finish_reason == "abort"``. ``RequestOutput.merge`` accumulates deltas into a whole result.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from dsv.backend.interface import Backend, OpTable
from dsv.engine.block_manager import BlockManager
from dsv.engine.compiled_decode import CompiledDecode
from dsv.engine.config import EngineConfig, available_memory
from dsv.engine.detokenize import TextStream
from dsv.engine.graphs import build_decode_runner
from dsv.engine.kv_pool import CacheSpec, KVPool, plan_num_pages
from dsv.engine.model_runner import ModelRunner
from dsv.engine.outputs import CompletionOutput, Logprob, RequestOutput
from dsv.engine.request import Request
from dsv.engine.sampler import TopLogprobs
from dsv.engine.sampling import SamplingParams
from dsv.engine.scheduler import Scheduler
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM


@dataclass
class EngineStats:
    """A snapshot for logs and metrics."""

    num_running: int
    num_waiting: int
    kv_pages_total: int
    kv_pages_used: int
    kv_pages_cached: int
    prefix_hit_rate: float
    prefix_hit_tokens: int
    num_preemptions: int
    prompt_tokens_computed: int
    generation_tokens: int


@dataclass
class _Parent:
    """A client request: its prompt and its ``n`` sequences."""

    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]


class LLMEngine:
    """Continuous-batching engine over one model replica.

    ``backend`` (the one ``ops`` came from) is asked once, after the KV pool is allocated, to capture the
    decode forward (:meth:`Backend.decode_runner`, e.g. CUDA graphs); None, ``--disable-cuda-graph`` or a
    backend without graphs means every step runs eagerly.
    """

    def __init__(
        self,
        model: DeepseekV32ForCausalLM,
        ops: OpTable,
        config: EngineConfig | None = None,
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
        backend: Backend | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        cfg = model.cfg
        # CPU: FP8 indexer keys also kept in bf16, so that each decode step's reads need not widen them.
        self.spec = CacheSpec(
            config.page_size,
            config.kv_cache_dtype,
            config.indexer_quant,
            index_read_copy=self.device.type == "cpu" and config.indexer_quant == "fp8",
        )
        limit = min(cfg.max_position_embeddings, config.max_model_len or cfg.max_position_embeddings)
        num_pages = plan_num_pages(
            cfg,
            self.spec,
            model.dtype,
            self._kv_budget_bytes() if config.max_total_tokens is None else None,
            config.max_total_tokens,
            config.enable_mtp,
            max_useful_tokens=limit * config.max_running_requests,
        )
        self.pool = KVPool(cfg, self.spec, num_pages, model.dtype, self.device, with_mtp=config.enable_mtp)
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, config.chunked_prefill_size, config.max_running_requests
        )
        self.max_model_len = min(limit, self.pool.capacity_tokens)
        self.decode_runner = build_decode_runner(
            backend,
            model,
            self.pool,
            ops,
            config.graph_settings(),
            # A decode step holds at most max_running sequences and at most one token budget of them.
            max_batch_size=min(config.max_running_requests, config.chunked_prefill_size),
            max_seq_len=self.max_model_len,
            cache_config=self.cache_config(),
            kernel_choices=config.kernel_choices(),
        )
        if config.enable_torch_compile:
            if self.decode_runner is not None:
                raise ValueError(
                    "--enable-torch-compile is for backends without decode graphs (cpu); this backend captures "
                    "decode steps in graphs already (add --disable-cuda-graph to compile instead)"
                )
            self.decode_runner = CompiledDecode(model, ops, self.pool)
        self.runner = ModelRunner(model, ops, self.pool, self.device, config.seed, self.decode_runner)
        self._commands: deque[tuple[str, Any]] = deque()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()  # guards _live_ids, shared with client threads
        self._live_ids: set[str] = set()
        self._parents: dict[str, _Parent] = {}
        self._next_seq = 0
        self._prompt_tokens = 0
        self._generated_tokens = 0
        if config.log_stats:
            print(self.kv_summary(), file=sys.stderr)
            if self.decode_runner is not None:
                print(self.decode_runner.describe(), file=sys.stderr)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = "auto",
        config: EngineConfig | None = None,
    ) -> LLMEngine:
        """Load ``model`` (folder, cached Hub id, or None for the embedded default) on backend ``device``."""
        from dsv.backend.registry import select_backend
        from dsv.config import ModelConfig
        from dsv.engine.config import resolve_dtype
        from dsv.model.loader import load_model
        from dsv.model.resolve import resolve_model_path
        from dsv.tokenizer import Tokenizer

        config = config or EngineConfig()
        backend = select_backend(device)
        reasons = backend.validate(
            {
                "kv_cache_dtype": config.kv_cache_dtype,
                "page_size": config.page_size,
                "nsa_prefill": config.nsa_prefill,
                "nsa_decode": config.nsa_decode,
            }
        )
        if reasons:
            raise ValueError("; ".join(reasons))
        torch_device = backend.capabilities().torch_device
        path = resolve_model_path(model)
        torch_dtype = resolve_dtype(dtype, ModelConfig.from_file(path).dtype)
        loaded = load_model(path, torch_dtype, torch_device)
        ops = backend.ops(config.kernel_choices(), cache_config(config, torch_dtype))
        return cls(loaded, ops, config, Tokenizer.from_model_dir(path), torch_device, backend)

    # ----- client side (any thread) -----
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        prompt: str | None = None,
    ) -> None:
        """Queue a request. Raises ValueError at once for a request that can never run."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        self._validate(request_id, ids, params)
        with self._lock:
            if request_id in self._live_ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._live_ids.add(request_id)
        self._commands.append(("add", (request_id, ids, params, prompt)))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Abort a waiting or running request (no-op if it is unknown or already finished)."""
        self._commands.append(("abort", request_id))
        self._wakeup.set()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (at the start of the next step)."""
        self._commands.append(("flush", None))
        self._wakeup.set()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live_ids) or bool(self._commands)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (or ``timeout``); returns whether there is."""
        if self.has_unfinished():
            return True
        self._wakeup.wait(timeout)
        self._wakeup.clear()
        return self.has_unfinished()

    # ----- engine thread -----
    def step(self) -> list[RequestOutput]:
        """Apply queued commands, run one forward, return the new outputs of every request that has any."""
        touched: dict[str, None] = {}
        self._apply_commands(touched)
        out = self.scheduler.schedule()
        if not out.is_empty:
            results = self.runner.execute(out)
            self.scheduler.update(out)
            for chunk, res in zip(out.chunks, results):
                req = chunk.request
                self._prompt_tokens += max(0, min(req.num_prompt_tokens - chunk.start, chunk.num_tokens))
                if res is None:
                    continue
                token, lp = res
                req.append_token(token, self._to_logprobs(token, lp))
                self._generated_tokens += 1
                touched[req.parent_id] = None
                if req.finished:
                    self.scheduler.finish(req)
        return [self._output(pid) for pid in touched if pid in self._parents]

    def _apply_commands(self, touched: dict[str, None]) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                self._add(*arg)
            elif kind == "abort" and arg in self._parents:
                for child in self._parents[arg].children:
                    if not child.finished:
                        self.scheduler.abort(child.request_id)
                touched[arg] = None
            elif kind == "flush":
                self.scheduler.flush_prefix_cache()

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            text = None
            if self.tokenizer is not None:
                text = TextStream(
                    self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
                )
            self._next_seq += 1
            req = Request(
                f"seq-{self._next_seq}",  # internal, unique even if client ids look alike
                ids,
                params,
                parent_id=request_id,
                index=i,
                eos_token_ids=self.model.cfg.eos_token_ids,
                max_model_len=self.max_model_len,
                text=text,
                generator=gen,
            )
            children.append(req)
            self.scheduler.add(req)
        self._parents[request_id] = _Parent(prompt, ids, children)

    def _output(self, parent_id: str) -> RequestOutput:
        parent = self._parents[parent_id]
        deltas = []
        for child in parent.children:
            done_now = child.finished and not child.reported_finish
            if not (child.new_token_ids or child.new_text or done_now):
                continue
            want_lp = child.params.logprobs is not None
            deltas.append(
                CompletionOutput(
                    child.index,
                    child.new_token_ids,
                    child.new_text,
                    child.new_logprobs if want_lp else None,
                    child.cumulative_logprob if want_lp else None,
                    child.finish_reason,
                    child.stop_reason,
                )
            )
            child.new_token_ids, child.new_text, child.new_logprobs = [], "", []
            child.reported_finish = child.finished
        finished = all(c.finished for c in parent.children)
        if finished:
            del self._parents[parent_id]
            with self._lock:
                self._live_ids.discard(parent_id)
        metrics = parent.children[0].metrics
        return RequestOutput(parent_id, parent.prompt_token_ids, deltas, finished, parent.prompt, metrics)

    # ----- helpers -----
    def _validate(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum of "
                f"{self.max_model_len} tokens per sequence (model context and KV cache capacity)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        if params.max_tokens == 0:
            raise ValueError("max_tokens must be >= 1 for generation")

    def _to_logprobs(self, token: int, lp: TopLogprobs | None) -> dict[int, Logprob] | None:
        if lp is None:
            return None
        dec = self.tokenizer.decode if self.tokenizer is not None else None
        out = {token: Logprob(lp.logprob, lp.rank, dec([token]) if dec else None)}
        for rank, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(val, rank, dec([tid]) if dec else None)
        return out

    def _kv_budget_bytes(self) -> int:
        frac = self.config.mem_fraction_static
        if frac is None:
            frac = 0.2 if self.device.type == "cpu" else 0.9
        return int(available_memory(self.device) * frac)

    def cache_config(self) -> dict[str, Any]:
        """The cache configuration as the backends' ``validate()`` / ``ops()`` keys."""
        return cache_config(self.config, self.model.dtype)

    def kv_summary(self) -> str:
        """One line: how many tokens fit and what a token costs."""
        layer = self.pool.layers[0]
        mla, idx = layer.mla.bytes_per_token, layer.index.bytes_per_token
        n = len(self.pool.layers)
        per_token = (mla + idx) * n
        total = per_token * self.pool.capacity_tokens
        return (
            f"KV cache: {self.pool.capacity_tokens} tokens ({self.pool.num_pages - 1} pages of "
            f"{self.spec.page_size}), {per_token} bytes/token = {n} layers x (MLA {mla} "
            f"[{self.spec.kv_cache_dtype}] + indexer {idx} [{self.spec.indexer_quant}"
            f"{' + bf16 read copy' if self.spec.index_read_copy else ''}]), "
            f"{total / 2**30:.3f} GiB; prefix cache {'on' if self.config.enable_prefix_caching else 'off'}"
        )

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_pages_total=bm.num_pages - 1,
            kv_pages_used=bm.num_used,
            kv_pages_cached=bm.num_cached,
            prefix_hit_rate=bm.stats.hit_rate,
            prefix_hit_tokens=bm.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_computed=self._prompt_tokens,
            generation_tokens=self._generated_tokens,
        )


def cache_config(config: EngineConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``validate()``-style keys of an engine configuration for a model computing in ``dtype``."""
    return {
        "kv_cache_dtype": config.kv_cache_dtype,
        "page_size": config.page_size,
        "indexer_quant": config.indexer_quant,
        "dtype": dtype,
    }
