"""What the engine hands back: per-step deltas from :meth:`LLMEngine.step`, merged into whole results.

``step()`` returns one :class:`RequestOutput` per request that produced something in that step. Its
completions carry only what is *new* (``token_ids``, ``text`` and ``logprobs`` of this step), so a server can
stream them as they are; :meth:`RequestOutput.merge` accumulates deltas into the whole result
(``LLM.generate`` does this).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log probability under the model (raw logits, before temperature and filters)."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt (``index`` < SamplingParams.n).

    Attributes:
        token_ids: generated token ids (a step's delta, or all of them after merging).
        text: detokenized text of those tokens (stop strings cut, no broken UTF-8 character).
        logprobs: per token, {token id: Logprob} for the sampled token and the top ``logprobs`` ones.
        cumulative_logprob: sum of the sampled tokens' logprobs (when logprobs were requested).
        finish_reason: None while running, then "stop", "length" or "abort".
        stop_reason: the stop string or stop token id that ended it (None for EOS or length).
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same completion."""
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic()) and counts of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The outputs of one request (all its ``n`` completions)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    metrics: RequestMetrics | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0

    def merge(self, delta: RequestOutput) -> None:
        """Accumulate a later step's delta of the same request."""
        by_index = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            if c.index in by_index:
                by_index[c.index].merge(c)
            else:
                self.outputs.append(
                    CompletionOutput(
                        c.index,
                        list(c.token_ids),
                        c.text,
                        list(c.logprobs) if c.logprobs is not None else None,
                        c.cumulative_logprob,
                        c.finish_reason,
                        c.stop_reason,
                    )
                )
        self.outputs.sort(key=lambda c: c.index)
        self.finished = delta.finished
        self.metrics = delta.metrics or self.metrics
