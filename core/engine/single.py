"""A single-request generation loop over a real incremental paged KV cache (no prefix recomputation)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dsv.backend.interface import Backend, OpTable
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.graphs import GraphSettings, build_decode_runner
from dsv.engine.kv_pool import CacheSpec, KVPool
from dsv.engine.sampling import SamplingParams, sample
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM


class SingleRequestGenerator:
    """Prefills a prompt once, then decodes one token per forward, growing the page list as needed.

    With ``backend`` and ``graphs`` (not disabled), decode steps run through the backend's captured decode
    forward (batch size 1, context up to ``max_total_tokens``), as in the engine.
    """

    def __init__(
        self,
        model: DeepseekV32ForCausalLM,
        ops: OpTable,
        spec: CacheSpec,
        max_total_tokens: int = 4096,
        device: str = "cpu",
        backend: Backend | None = None,
        graphs: GraphSettings | None = None,
    ) -> None:
        self.model = model
        self.ops = ops
        self.spec = spec
        self.device = device
        num_pages = -(-max_total_tokens // spec.page_size) + 1
        self.pool = KVPool(model.cfg, spec, num_pages, model.dtype, device)
        self.decode = build_decode_runner(
            backend,
            model,
            self.pool,
            ops,
            graphs or GraphSettings(disable=True),
            max_batch_size=1,
            max_seq_len=self.pool.capacity_tokens,
            cache_config={
                "kv_cache_dtype": spec.kv_cache_dtype,
                "page_size": spec.page_size,
                "indexer_quant": spec.indexer_quant,
                "dtype": model.dtype,
            },
        )

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids until max_tokens, EOS (unless ignore_eos) or a stop token."""
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if len(prompt_ids) + params.max_tokens > self.pool.capacity_tokens:
            raise ValueError(
                f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds the cache "
                f"capacity of {self.pool.capacity_tokens} tokens"
            )
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stops = set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(self.model.cfg.eos_token_ids)
        )
        pages: list[int] = []
        try:
            tokens = list(prompt_ids)
            start, new = 0, list(prompt_ids)
            for _ in range(params.max_tokens):
                need = -(-(start + len(new)) // self.spec.page_size) - len(pages)
                if need > 0:
                    pages += self.pool.allocate(need)
                meta = build_metadata([SeqChunk(start, len(new), pages)], self.spec.page_size, self.device)
                ids = torch.tensor(new, dtype=torch.int64, device=self.device)
                if self.decode is not None and len(new) == 1:
                    hidden = self.decode(ids, meta)  # a static buffer: logits below are computed at once
                else:
                    hidden = self.model(ids, meta, self.pool.layers, self.ops)
                token = sample(self.model.logits(hidden[-1:])[0].cpu(), params, gen)
                yield token
                if token in stops:
                    return
                tokens.append(token)
                start, new = len(tokens) - 1, [token]
        finally:
            self.pool.release(pages)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        return list(self.stream(prompt_ids, params))
