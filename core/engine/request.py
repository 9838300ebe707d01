"""Per-sequence state: tokens, how many have their KV computed, the pages holding it, and the stop checks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from dsv.engine.detokenize import TextStream
from dsv.engine.outputs import Logprob, RequestMetrics
from dsv.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV was freed; it is recomputed on readmission)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence: a prompt and one completion (a request with ``n > 1`` becomes ``n`` of these).

    ``all_token_ids = prompt + output``; the KV of ``all_token_ids[:num_computed_tokens]`` is in ``pages``.
    The next forward computes ``all_token_ids[num_computed_tokens:]`` (a prefill chunk, or the last sampled
    token when decoding); a token is sampled once every token has its KV.
    """

    request_id: str  # unique per sequence
    prompt_token_ids: list[int]
    params: SamplingParams
    parent_id: str = ""  # the id the client knows (same as request_id when n == 1)
    index: int = 0  # completion index within the parent
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 62
    text: TextStream | None = None
    generator: torch.Generator | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    pages: list[int] = field(default_factory=list)
    page_nodes: list[int] = field(default_factory=list)  # prefix-cache node of pages[i], for indexed pages
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    # Not yet reported to the client (drained by the engine into a RequestOutput delta).
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    reported_finish: bool = False

    def __post_init__(self) -> None:
        self.parent_id = self.parent_id or self.request_id
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)
        self._stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            self._stop_ids |= set(self.eos_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def stop_token_ids(self) -> set[int]:
        """Token ids that end this completion (EOS unless ignore_eos, plus stop_token_ids)."""
        return self._stop_ids

    def append_token(self, token_id: int, logprobs: dict[int, Logprob] | None = None) -> None:
        """Record a sampled token and decide whether the completion is finished."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if logprobs is not None:
            self.new_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        n_out = len(self.output_token_ids)
        if token_id in self._stop_ids and n_out >= self.params.min_tokens:
            # EOS / stop tokens are kept in token_ids but not rendered in the text.
            self._finish("stop", None if token_id in self.eos_token_ids else token_id)
            return
        if self.text is not None:
            piece, stop = self.text.push(token_id)
            self.new_text += piece
            if stop is not None:
                self._finish("stop", stop, flush=False)
                return
        if n_out >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self._finish("length")

    def _finish(self, reason: str, stop_reason: int | str | None = None, flush: bool = True) -> None:
        if flush and self.text is not None:
            piece, stop = self.text.finish()
            self.new_text += piece
            if stop is not None:
                reason, stop_reason = "stop", stop
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.status = RequestStatus.FINISHED
        self.metrics.finished_time = time.monotonic()

    def abort(self) -> None:
        self._finish("abort")

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone; prompt and output so far are recomputed on readmission."""
        self.num_computed_tokens = 0
        self.pages = []
        self.page_nodes = []
        self.status = RequestStatus.WAITING
        self.metrics.num_preemptions += 1
