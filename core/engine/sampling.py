"""Sampling parameters (vLLM's names and defaults) and the single-row sampler of the one-request loop.

The batched sampler used by the serving engine is :mod:`dsv.engine.sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` means greedy (deterministic).

    Attributes:
        n: number of completions of the prompt (child ``i`` is seeded with ``seed + i``).
        temperature, top_p, top_k (0 or -1: off), min_p: the usual filters, applied in that order.
        repetition_penalty: > 1 discourages every token of the prompt and the output (CTRL-style).
        frequency_penalty / presence_penalty: subtracted per occurrence / once for tokens of the output.
        seed: per-request seed: the same request gives the same tokens in any batch.
        stop: strings that end the completion (not included in the text unless include_stop_str_in_output).
        stop_token_ids: token ids that end the completion (kept in token_ids, not rendered in text).
        max_tokens / min_tokens: bounds on the number of generated tokens.
        ignore_eos: keep going after the model's EOS token.
        logprobs: return the sampled token's logprob and this many top logprobs per step (None: off).
        skip_special_tokens: leave BOS/EOS out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k < 0:
            if self.top_k != -1:
                raise ValueError(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
            self.top_k = 0
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            raise ValueError("frequency_penalty and presence_penalty must be in [-2, 2]")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from fp32 logits [vocab] (temperature, top_k, top_p; penalties are ignored here)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k:
        kth = probs.topk(min(params.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(0) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
