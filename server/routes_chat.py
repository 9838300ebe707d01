"""OpenAI-compatible ``/v1/chat/completions`` with DeepSeek-V3.2 encoding, thinking and tool calls.

The prompt is rendered by :func:`dsv.chat.encode_chat`; generated text is split into ``reasoning_content``,
``content`` and ``tool_calls`` by :func:`dsv.chat.parse_completion` (whole) or
:class:`dsv.chat.StreamingParser` (streamed), so tool-call markup never reaches ``content``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from dsv.chat import Delta, StreamingParser, encode_chat, generation_starts_in_reasoning, parse_completion
from dsv.engine.outputs import Logprob, RequestOutput
from dsv.server.app import ServerState, state_of
from dsv.server.openai_protocol import APIError, ChatCompletionRequest
from dsv.server.routes_openai import (
    check_model,
    collect,
    new_id,
    resolve_max_tokens,
    sse_response,
    token_text,
    usage,
)

router = APIRouter()


def chat_logprobs(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int
) -> dict:
    """The chat ``logprobs`` object: per token its logprob and the ``top`` most likely alternatives."""
    content = []
    for tid, entry in zip(token_ids, logprobs):
        text = token_text(state, tid, entry.get(tid))
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        content.append(
            {
                "token": text,
                "logprob": entry[tid].logprob if tid in entry else None,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (t := token_text(state, i, lp)),
                        "logprob": lp.logprob,
                        "bytes": list(t.encode()),
                    }
                    for i, lp in ranked
                ],
            }
        )
    return {"content": content}


class ChoiceStream:
    """One choice's generated text -> OpenAI chat ``delta`` dicts (reasoning, content, tool calls).

    Tool calls are numbered per choice as OpenAI streams them (``index``), and each is emitted whole,
    once its end marker has been generated.
    """

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._parser = StreamingParser(starts_in_reasoning)
        self.num_tool_calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [self._delta(d) for d in self._parser.feed(text)] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return [self._delta(d) for d in self._parser.finish()]

    def _delta(self, d: Delta) -> dict[str, Any]:
        if d.kind == "reasoning":
            return {"reasoning_content": d.text}
        if d.kind == "content":
            return {"content": d.text}
        call = d.tool_call
        self.num_tool_calls += 1
        return {
            "tool_calls": [
                {
                    "index": self.num_tool_calls - 1,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ]
        }


def finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    if engine_reason == "stop" and has_tool_calls:
        return "tool_calls"
    return engine_reason


async def chat_stream_chunks(
    outputs: AsyncIterator[RequestOutput],
    *,
    starts_in_reasoning: bool,
    n: int,
    chunk_base: dict[str, Any],
    logprobs_of: Any = None,
) -> AsyncIterator[dict[str, Any]]:
    """Engine deltas of one chat request -> ``chat.completion.chunk`` dicts (without usage).

    ``logprobs_of(token_ids, logprobs)`` builds a choice's ``logprobs`` (None: not requested); they ride
    on the first chunk of the engine delta that produced them.
    """
    streams = {i: ChoiceStream(starts_in_reasoning) for i in range(n)}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None, lps: Any = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": reason}
        return {**chunk_base, "choices": [choice]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for out in outputs:
        for c in out.outputs:
            cs = streams[c.index]
            deltas = cs.feed(c.text)
            if c.finished:
                deltas += cs.finish()
            lps = logprobs_of(c.token_ids, c.logprobs) if logprobs_of and c.logprobs else None
            if lps and not deltas:
                deltas = [{}]
            for k, delta in enumerate(deltas):
                yield chunk(c.index, delta, lps=lps if k == 0 else None)
            if c.finished:
                yield chunk(c.index, {}, finish_reason(c.finish_reason, cs.num_tool_calls > 0))


def _thinking(body: ChatCompletionRequest) -> bool:
    kwargs = body.chat_template_kwargs or {}
    value = kwargs.get("thinking", kwargs.get("enable_thinking", False))
    if not isinstance(value, bool):
        raise APIError(
            400, "chat_template_kwargs.thinking must be true or false", param="chat_template_kwargs"
        )
    return value


def _tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    choice = body.tool_choice
    if choice is None or choice == "auto":
        return body.tools or None
    if choice == "none":
        return None  # the model is not told about tools, so it cannot call them
    # Forcing a call needs constrained decoding, which is not built: refuse rather than ignore it.
    raise APIError(
        400,
        f"tool_choice {choice!r} is not supported yet (no constrained decoding); use 'auto' or 'none'",
        param="tool_choice",
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """Chat completion; ``chat_template_kwargs: {"thinking": true}`` turns DeepSeek thinking on."""
    st = state_of(request)
    model = check_model(st, body.model)
    thinking = _thinking(body)
    messages = body.messages
    prompt = encode_chat(messages, thinking=thinking, tools=_tools(body))
    reasoning = generation_starts_in_reasoning(messages, thinking)
    ids = st.tokenizer.encode(prompt)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = resolve_max_tokens(st, len(ids), requested, None)
    top = body.top_logprobs or 0
    params = body.sampling_params(max_tokens, top if body.logprobs else None)
    rid = new_id("chatcmpl")
    stream = st.engine.submit([(rid, ids, params, prompt)])
    created = int(time.time())

    def logprobs_of(token_ids: list[int], lps: list[dict[int, Logprob]] | None) -> dict | None:
        return chat_logprobs(st, token_ids, lps, top) if lps is not None else None

    if body.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def counted() -> AsyncIterator[RequestOutput]:
            nonlocal completion_tokens
            async for out in stream:
                completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                yield out

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for ch in chat_stream_chunks(
                counted(), starts_in_reasoning=reasoning, n=body.n, chunk_base=base, logprobs_of=logprobs_of
            ):
                yield ch
            if include_usage:
                yield {**base, "choices": [], "usage": usage(len(ids), completion_tokens)}

        completion_tokens = 0
        return await sse_response(events(), stream)

    out = (await collect(stream, request))[rid]
    choices = []
    for c in out.outputs:
        parsed = parse_completion(c.text, reasoning)
        calls = [
            {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
            for t in parsed.tool_calls
        ]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or (None if calls else "")}
        if reasoning or thinking:
            message["reasoning_content"] = parsed.reasoning_content
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs_of(c.token_ids, c.logprobs),
                "finish_reason": finish_reason(c.finish_reason, bool(calls)),
            }
        )
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(len(ids), completion_tokens, out.num_cached_tokens),
    }
