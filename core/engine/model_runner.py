"""Runs one scheduled batch: metadata, the model forward, the lm_head on the sampling rows, the sampler.

Pure decode steps (one token per sequence) go through the backend's decode runner when there is one (CUDA
graphs); prefill and mixed steps run the model eagerly.
"""

from __future__ import annotations

import torch

from dsv.backend.interface import DecodeRunner, OpTable
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.greedy import exact_greedy
from dsv.engine.int8_screen import Int8Screen
from dsv.engine.kv_pool import KVPool
from dsv.engine.request import Request
from dsv.engine.sampler import Sampler, SampleRow, TopLogprobs
from dsv.engine.scheduler import SchedulerOutput
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

#: Keep an fp32 copy of the lm_head when it is at most this big (model.logits would upcast it every step).
_HEAD_CACHE_BYTES = 1 << 30

SampleResult = tuple[int, TopLogprobs | None]


class ModelRunner:
    """Owns the KV pool and turns a :class:`SchedulerOutput` into one sampled token per finishing sequence.

    ``decode``: the captured decode forward (:meth:`Backend.decode_runner`), used for pure decode steps.
    """

    def __init__(
        self,
        model: DeepseekV32ForCausalLM,
        ops: OpTable,
        pool: KVPool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        decode: DecodeRunner | None = None,
    ) -> None:
        self.model = model
        self.ops = ops
        self.pool = pool
        self.decode = decode
        self.steps = {"decode_runner": 0, "eager": 0}
        self.device = torch.device(device)
        self.sampler = Sampler(model.cfg.vocab_size, self.device, seed)
        w = model.lm_head.weight
        self._weight = w
        self._lowp = w.dtype in (torch.bfloat16, torch.float16)
        # Same math as model.logits (fp32 head on fp32 hidden), without re-converting the weight each step.
        self._head = w if w.dtype == torch.float32 else None
        if self._head is None and w.numel() * 4 <= _HEAD_CACHE_BYTES:
            self._head = w.float()
        # CPU: the int8 screen halves the head's bytes and replaces the vocabulary-wide top-k (exact_greedy).
        self._screen = Int8Screen.build(w) if self._lowp and w.device.type == "cpu" else None

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
        if self.decode is not None and meta.is_decode and meta.num_tokens == meta.num_seqs:
            # May be a view of a graph's static output: the row gather below copies it before the next step.
            hidden = self.decode(input_ids, meta)
            self.steps["decode_runner"] += 1
        else:
            hidden = self.model(input_ids, meta, self.pool.layers, self.ops)
            self.steps["eager"] += 1
        results: list[SampleResult | None] = [None] * len(out.chunks)
        if not sampling:
            return results
        hidden = hidden[torch.tensor(last_rows, device=self.device)]  # advanced indexing: a copy
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
        """argmax [N] of the fp32 logits of a bf16/fp16 model, at about one low-precision GEMM's cost."""
        head32 = self._head if self._head is not self._weight else None
        return exact_greedy(hidden, self._weight, screen=self._screen, weight_fp32=head32)


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
