"""Batched sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Everything is a tensor op over the batch [B, V]; Python loops run over rows only where a row needs its own
random stream (seeded requests) or its own token list (penalties). Sampling draws ``argmax(p / q)`` with
``q ~ Exp(1)`` per vocabulary entry (the exponential race, equal in law to sampling from ``p``), which lets a
seeded row use its own generator while the others share one batched draw. Greedy rows take the argmax and
consume no randomness, so greedy output never depends on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv.engine.sampling import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    stop_token_ids: Sequence[int] = ()  # masked while len(output) < min_tokens


@dataclass
class TopLogprobs:
    """The sampled token's raw logprob and rank, plus the top-k (ids, logprobs) of one row."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SampleRow]
    ) -> tuple[list[int], list[TopLogprobs | None]]:
        """Sample one token per row of fp32 ``logits`` [B, V]; returns (token ids, logprobs or None per row)."""
        params = [r.params for r in rows]
        raw = logits
        x = self._mask_min_tokens(logits, rows)
        if any(p.has_penalties for p in params):
            x = apply_penalties(x, rows)
        tokens = x.argmax(dim=-1) if all(p.greedy for p in params) else self._sample(x, rows)
        return tokens.tolist(), self._logprobs(raw, tokens, params)

    def _mask_min_tokens(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        masked = [
            (i, list(r.stop_token_ids))
            for i, r in enumerate(rows)
            if r.stop_token_ids and len(r.output_token_ids) < r.params.min_tokens
        ]
        if not masked:
            return logits
        logits = logits.clone()
        for i, ids in masked:
            logits[i, ids] = float("-inf")
        return logits

    def _sample(self, x: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        dev = x.device
        greedy_tokens = x.argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
        x = x / temps[:, None]
        if any(p.top_k for p in params):
            x = apply_top_k(x, [p.top_k for p in params])
        probs = torch.softmax(x, dim=-1)
        if any(p.top_p < 1 for p in params):
            probs = apply_top_p(probs, [p.top_p for p in params])
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            probs = probs.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p[:, None], 0.0)
        q = self._exponential(probs.shape, rows)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy, greedy_tokens, sampled)

    def _exponential(self, shape: torch.Size, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Exp(1) noise [B, V]: seeded rows from their own generator, the others from the shared one."""
        q = torch.empty(shape, device=self.device)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None and not r.params.greedy]
        if len(seeded) < len(rows):
            q.exponential_(generator=self.generator)
        for i in seeded:
            q[i].exponential_(generator=rows[i].generator)
        return q

    def _logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TopLogprobs | None]:
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TopLogprobs | None] = [None] * len(params)
        if not want:
            return out
        idx = torch.tensor(want, device=raw.device)
        lp = torch.log_softmax(raw[idx].float(), dim=-1)
        chosen = tokens[idx]
        chosen_lp = lp.gather(1, chosen[:, None])[:, 0]
        ranks = (lp > chosen_lp[:, None]).sum(-1) + 1
        k = max(params[i].logprobs for i in want)
        top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], chosen[:, None][:, :0])
        chosen_l, ranks_l, top_lp_l, top_ids_l = (
            chosen_lp.tolist(),
            ranks.tolist(),
            top_lp.tolist(),
            top_ids.tolist(),
        )
        for j, i in enumerate(want):
            n = params[i].logprobs
            out[i] = TopLogprobs(chosen_l[j], ranks_l[j], top_ids_l[j][:n], top_lp_l[j][:n])
        return out


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition (prompt and output tokens), frequency and presence (output tokens) penalties."""
    b, v = logits.shape
    dev = logits.device
    counts = _token_counts([r.output_token_ids for r in rows], v, dev)
    seen = counts > 0
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[:, None]
    if (rep != 1).any():
        in_prompt = _token_counts([r.prompt_token_ids for r in rows], v, dev) > 0
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen | in_prompt, penalized, logits)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[:, None]
    return logits - freq * counts - pres * seen.float()


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] fp32 occurrence counts (padding goes to an extra column that is dropped)."""
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(longest, 1)), vocab, dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (0 = all); ties at the k-th value are kept."""
    v = logits.shape[-1]
    ks = torch.tensor([k if 0 < k < v else v for k in top_k], device=logits.device)
    kmax = int(ks.max())
    kth = logits.topk(kmax, dim=-1).values.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(probs: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the top token always)."""
    p = torch.tensor(top_p, device=probs.device)[:, None]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(1, order, sorted_p)
