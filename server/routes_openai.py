"""OpenAI-compatible ``/v1/models`` and ``/v1/completions``, and the helpers the chat route shares."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dsv.engine.outputs import Logprob, RequestOutput
from dsv.server.app import ServerState, state_of
from dsv.server.engine_client import RequestStream
from dsv.server.openai_protocol import APIError, CompletionRequest, error_body

router = APIRouter()


# ----- shared helpers -----
def check_model(state: ServerState, name: str | None) -> str:
    """The served name; 404 for a model this server does not serve."""
    if name and name not in (state.served_model_name, state.model_path):
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {state.served_model_name!r}",
            "not_found_error",
            "model",
            "model_not_found",
        )
    return state.served_model_name


def resolve_max_tokens(
    state: ServerState, prompt_len: int, requested: int | None, default: int | None
) -> int:
    """``max_tokens`` checked against the context; the room left when not given (capped by ``default``)."""
    limit = state.engine.max_model_len
    if prompt_len >= limit:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens long but the maximum context length is {limit} tokens "
            "(prompt plus at least one generated token must fit)",
            param="prompt",
            code="context_length_exceeded",
        )
    room = limit - prompt_len
    if requested is None:
        return min(default, room) if default else room
    if requested > room:
        raise APIError(
            400,
            f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceeds the maximum context "
            f"length of {limit} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_response(events: AsyncIterator[dict[str, Any]], stream: RequestStream) -> StreamingResponse:
    """Serve ``events`` as server-sent events ending with ``[DONE]``; abort the requests on any exit.

    A client disconnect cancels the body iterator; the ``finally`` then aborts what is unfinished so the
    engine frees the pages at once.
    """

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield sse(event)
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            yield sse(error_body(str(exc), "server_error", code=500))
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


#: How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


async def collect(stream: RequestStream, request: Request | None = None) -> dict[str, RequestOutput]:
    """Merge every delta of the stream's requests (aborting them if interrupted).

    With ``request``, the client's connection is watched while the requests run: a client that goes away
    before a non-streaming answer is ready gets its requests aborted (and their KV pages freed) at once
    instead of when the whole completion would have finished.
    """
    merged: dict[str, RequestOutput] = {}

    async def merge_all() -> None:
        async for delta in stream:
            if delta.request_id in merged:
                merged[delta.request_id].merge(delta)
            else:
                merged[delta.request_id] = RequestOutput(delta.request_id, delta.prompt_token_ids, [])
                merged[delta.request_id].merge(delta)

    task = asyncio.ensure_future(merge_all())
    try:
        while request is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not done and await request.is_disconnected():
                task.cancel()
                # Nobody will read the answer; 499 is nginx's "client closed request" for the access log.
                raise APIError(499, "client disconnected; request aborted", "client_closed_request")
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        if not task.done():
            task.cancel()
        await stream.aclose()
    return merged


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def token_text(state: ServerState, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.tokenizer.decode([token_id])


def completion_logprobs(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, Logprob]], offset: int
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for these tokens; offsets start at ``offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs):
        text = token_text(state, tid, entry.get(tid))
        tokens.append(text)
        values.append(entry[tid].logprob if tid in entry else None)
        tops.append({token_text(state, t, lp): lp.logprob for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ----- endpoints -----
@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The one served model."""
    st = state_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": st.served_model_name,
                "object": "model",
                "created": 0,
                "owned_by": "dsv",
                "root": st.model_path or st.served_model_name,
                "max_model_len": st.engine.max_model_len,
            }
        ],
    }


def _prompts(state: ServerState, prompt: Any) -> list[tuple[list[int], str | None]]:
    """Normalize the four OpenAI prompt forms to (token ids, text)."""
    if isinstance(prompt, str):
        return [(state.tokenizer.encode(prompt, add_bos=True), prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [(state.tokenizer.encode(p, add_bos=True), p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(list(prompt), None)]
    return [(list(p), None) for p in prompt]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    """Text completion of one or several prompts (``n`` choices each), streamed or not."""
    st = state_of(request)
    model = check_model(st, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this model", param="suffix")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs needs prompt logprobs, which are not built yet", param="echo")
    prompts = _prompts(st, body.prompt)
    rid = new_id("cmpl")
    reqs = []
    for i, (ids, text) in enumerate(prompts):
        max_tokens = resolve_max_tokens(st, len(ids), body.max_tokens, 16)
        reqs.append((f"{rid}-{i}", ids, body.sampling_params(max_tokens, body.logprobs), text))
    index_of = {r[0]: i for i, r in enumerate(reqs)}
    echo_text = [text if text is not None else st.tokenizer.decode(ids) for ids, text in prompts]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    stream = st.engine.submit(reqs)
    created = int(time.time())

    def choice_index(req_id: str, index: int) -> int:
        return index_of[req_id] * body.n + index

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[dict[str, Any]]:
            completion_tokens, offsets, echoed = 0, {}, set()
            async for delta in stream:
                choices = []
                for c in delta.outputs:
                    idx = choice_index(delta.request_id, c.index)
                    text = c.text
                    if body.echo and idx not in echoed:
                        echoed.add(idx)
                        text = echo_text[index_of[delta.request_id]] + text
                    completion_tokens += len(c.token_ids)
                    lps = None
                    if c.logprobs is not None:
                        lps = completion_logprobs(st, c.token_ids, c.logprobs, offsets.get(idx, 0))
                        offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lps["tokens"])
                    choices.append(
                        {"index": idx, "text": text, "logprobs": lps, "finish_reason": c.finish_reason}
                    )
                if choices:
                    yield {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": choices,
                    }
            if include_usage:
                yield {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens),
                }

        return await sse_response(events(), stream)

    results = await collect(stream, request)
    choices, completion_tokens, cached = [], 0, 0
    for req_id, out in results.items():
        cached += out.num_cached_tokens
        for c in out.outputs:
            prefix = echo_text[index_of[req_id]] if body.echo else ""
            completion_tokens += len(c.token_ids)
            lps = completion_logprobs(st, c.token_ids, c.logprobs, 0) if c.logprobs is not None else None
            choices.append(
                {
                    "index": choice_index(req_id, c.index),
                    "text": prefix + c.text,
                    "logprobs": lps,
                    "finish_reason": c.finish_reason,
                }
            )
    choices.sort(key=lambda c: c["index"])
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }
