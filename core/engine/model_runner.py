"""Runs one scheduled batch: metadata, the model forward, the lm_head on the sampling rows, the sampler."""

from __future__ import annotations

import torch

from dsv.backend.interface import OpTable
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.kv_pool import KVPool
from dsv.engine.request import Request
from dsv.engine.sampler import Sampler, SampleRow, TopLogprobs
from dsv.engine.scheduler import SchedulerOutput
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

#: Keep an fp32 copy of the lm_head when it is at most this big (model.logits would upcast it every step).
_HEAD_CACHE_BYTES = 1 << 30
#: Relative error bound of the greedy fast path: a bf16/fp16 GEMM rounds its output once (unit roundoff
#: 2^-8 for bf16), so two logits' errors add up to < 2^-7 of the largest magnitude; 2^-6 also covers the
#: rounding of the threshold itself and the accumulation order.
_LOWP_MARGIN = 2.0**-6

SampleResult = tuple[int, TopLogprobs | None]


class ModelRunner:
    """Owns the KV pool and turns a :class:`SchedulerOutput` into one sampled token per finishing sequence."""

    def __init__(
        self,
        model: DeepseekV32ForCausalLM,
        ops: OpTable,
        pool: KVPool,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.ops = ops
        self.pool = pool
        self.device = torch.device(device)
        self.sampler = Sampler(model.cfg.vocab_size, self.device, seed)
        w = model.lm_head.weight
        self._weight = w
        self._lowp = w.dtype in (torch.bfloat16, torch.float16)
        # Same math as model.logits (fp32 head on fp32 hidden), without re-converting the weight each step.
        self._head = w if w.dtype == torch.float32 else None
        if self._head is None and w.numel() * 4 <= _HEAD_CACHE_BYTES:
            self._head = w.float()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampleResult | None]:
        """Forward every chunk of ``out``; for chunks that reach the end of their sequence, sample a token.

        Returns, aligned with ``out.chunks``, (token id, logprobs or None) or None for a mid-prompt chunk.
        """
        ids: list[int] = []
        seq_chunks, last_rows, sampling = [], [], []
        for k, c in enumerate(out.chunks):
            ids += c.request.all_token_ids[c.start : c.start + c.num_tokens]
            seq_chunks.append(SeqChunk(c.start, c.num_tokens, c.request.pages))
            if c.samples:
                last_rows.append(len(ids) - 1)
                sampling.append(k)
        meta = build_metadata(seq_chunks, self.pool.page_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, meta, self.pool.layers, self.ops)
        results: list[SampleResult | None] = [None] * len(out.chunks)
        if not sampling:
            return results
        hidden = hidden[torch.tensor(last_rows, device=self.device)]
        reqs = [out.chunks[k].request for k in sampling]
        fast = [j for j, r in enumerate(reqs) if self._lowp and _plain_greedy(r)]
        fast_set = set(fast)
        slow = [j for j in range(len(reqs)) if j not in fast_set]
        if fast:
            tokens = self.greedy_tokens(hidden[fast] if slow else hidden).tolist()
            for j, t in zip(fast, tokens):
                results[sampling[j]] = (t, None)
        if slow:
            logits = self.logits(hidden[slow] if fast else hidden)
            tokens, logprobs = self.sampler(logits, [_sample_row(reqs[j]) for j in slow])
            for j, t, lp in zip(slow, tokens, logprobs):
                results[sampling[j]] = (t, lp)
        return results

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] (what model.logits computes)."""
        if self._head is None:
            return self.model.logits(hidden)
        return torch.nn.functional.linear(hidden.float(), self._head)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax [N] of the fp32 logits of a bf16/fp16 model, at about a third of the fp32 GEMM's cost.

        The head GEMM runs in the weight's dtype (exact products, fp32 accumulation, one rounding of the
        output); every token within the rounding margin of the best one is a candidate, and the candidates'
        fp32 logits (computed as model.logits does) decide. Ties go to the lowest id, as with argmax.
        """
        w = self._weight
        approx = torch.nn.functional.linear(hidden.to(w.dtype), w)
        top = approx.amax(dim=-1, keepdim=True).float()
        scale = torch.maximum(top.abs(), approx.amin(dim=-1, keepdim=True).float().abs())
        # Rounding the threshold to the weight dtype may raise it by one unit roundoff: the margin covers it.
        threshold = (top - scale * _LOWP_MARGIN - 1e-6).to(w.dtype)
        rows, cols = (approx >= threshold).nonzero(as_tuple=True)
        exact = (hidden[rows].float() * w[cols].float()).sum(-1)
        n = hidden.shape[0]
        best = torch.full((n,), float("-inf"), device=hidden.device).scatter_reduce(0, rows, exact, "amax")
        winner = exact == best[rows]
        first = torch.full((n,), w.shape[0], dtype=torch.int64, device=hidden.device)
        return first.scatter_reduce(0, rows[winner], cols[winner], "amin")


def _plain_greedy(req: Request) -> bool:
    """Greedy with nothing that needs the full logits (penalties, logprobs, min_tokens masking)."""
    p = req.params
    return (
        p.greedy
        and p.logprobs is None
        and not p.has_penalties
        and not (p.min_tokens and len(req.output_token_ids) < p.min_tokens)
    )


def _sample_row(req: Request) -> SampleRow:
    return SampleRow(
        req.params, req.prompt_token_ids, req.output_token_ids, req.generator, tuple(req.stop_token_ids)
    )
