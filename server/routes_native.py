"""SGLang-native endpoints: ``/generate``, health, model/server info, cache flush and ``/metrics``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dsv.engine.outputs import CompletionOutput, RequestOutput
from dsv.engine.sampling import SamplingParams
from dsv.server.app import state_of
from dsv.server.metrics import CONTENT_TYPE
from dsv.server.openai_protocol import (
    SGLANG_SAMPLING_KEYS,
    SGLANG_SAMPLING_NAMES,
    APIError,
    GenerateRequest,
)
from dsv.server.routes_openai import collect, new_id, resolve_max_tokens, sse_response

router = APIRouter()

HEALTH_TIMEOUT_S = 20.0


def _sampling(st: Any, body: GenerateRequest, prompt_len: int) -> SamplingParams:
    raw = dict(body.sampling_params)
    unknown = sorted(set(raw) - SGLANG_SAMPLING_KEYS)
    if unknown:
        raise APIError(400, f"unsupported sampling_params: {', '.join(unknown)}", param="sampling_params")
    kwargs = {SGLANG_SAMPLING_NAMES.get(k, k): v for k, v in raw.items() if v is not None}
    kwargs["max_tokens"] = resolve_max_tokens(st, prompt_len, kwargs.get("max_tokens"), 128)
    if body.return_logprob:
        kwargs["logprobs"] = body.top_logprobs_num
    try:
        return SamplingParams(**kwargs)
    except TypeError as exc:
        raise APIError(400, f"bad sampling_params: {exc}", param="sampling_params") from exc


def _meta(out: RequestOutput, c: CompletionOutput, start: float) -> dict[str, Any]:
    reason = None
    if c.finish_reason is not None:
        reason = {"type": c.finish_reason}
        if c.finish_reason == "length":
            reason["length"] = len(c.token_ids)
        elif c.stop_reason is not None:
            reason["matched"] = c.stop_reason
    meta = {
        "id": out.request_id,
        "finish_reason": reason,
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
        "cached_tokens": out.num_cached_tokens,
        "e2e_latency": time.monotonic() - start,
    }
    if c.logprobs is not None:
        meta["output_token_logprobs"] = [
            [lp[t].logprob if t in lp else None, t, None] for t, lp in zip(c.token_ids, c.logprobs)
        ]
        meta["output_top_logprobs"] = [
            [[v.logprob, i, None] for i, v in sorted(lp.items(), key=lambda kv: kv[1].rank)]
            for lp in c.logprobs
        ]
    return meta


@router.post("/generate")
@router.put("/generate", include_in_schema=False)
async def generate(body: GenerateRequest, request: Request) -> Any:
    """SGLang's native generation: ``text`` or ``input_ids``; the stream carries cumulative text."""
    st = state_of(request)
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    ids = body.input_ids if body.input_ids is not None else st.tokenizer.encode(body.text, add_bos=True)
    params = _sampling(st, body, len(ids))
    rid = body.rid or new_id("gen")
    start = time.monotonic()
    stream = st.engine.submit([(rid, ids, params, body.text)])

    if body.stream:

        async def events() -> AsyncIterator[dict[str, Any]]:
            acc = RequestOutput(rid, ids, [])
            async for delta in stream:
                acc.merge(delta)
                for c in delta.outputs:
                    whole = acc.outputs[[o.index for o in acc.outputs].index(c.index)]
                    item = {
                        "text": whole.text,
                        "output_ids": list(whole.token_ids),
                        "meta_info": _meta(acc, whole, start),
                    }
                    if params.n > 1:
                        item["index"] = c.index
                    yield item

        return await sse_response(events(), stream)

    out = (await collect(stream, request))[rid]
    items = [
        {"text": c.text, "output_ids": c.token_ids, "meta_info": _meta(out, c, start)} for c in out.outputs
    ]
    return items if params.n > 1 else items[0]


@router.get("/health")
async def health(request: Request) -> Response:
    """Cheap liveness: 200 while the engine runs and accepts work, 503 otherwise."""
    st = state_of(request)
    if not st.engine.ready:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """Generate one token through the engine; 503 if that fails or takes too long."""
    st = state_of(request)
    try:
        stream = st.engine.submit(
            [(new_id("HEALTH_CHECK"), [st.tokenizer.bos_token_id], SamplingParams(max_tokens=1), None)]
        )
        await asyncio.wait_for(collect(stream), HEALTH_TIMEOUT_S)
    except (Exception, asyncio.TimeoutError) as exc:
        return JSONResponse({"status": "unhealthy", "reason": str(exc)}, status_code=503)
    return Response(status_code=200)


@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(request: Request) -> dict[str, Any]:
    st = state_of(request)
    return {
        "model_path": st.model_path,
        "tokenizer_path": st.tokenizer_path,
        "served_model_name": st.served_model_name,
        "is_generation": True,
        "max_model_len": st.engine.max_model_len,
    }


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(request: Request) -> dict[str, Any]:
    from dataclasses import asdict

    st = state_of(request)
    return {
        **st.server_args,
        "version": "0.1.0",
        "max_total_num_tokens": st.engine.engine.pool.capacity_tokens,
        "max_model_len": st.engine.max_model_len,
        "internal_states": [asdict(st.engine.stats())],
    }


@router.post("/flush_cache")
@router.get("/flush_cache", include_in_schema=False)
async def flush_cache(request: Request) -> Response:
    """Forget the prefix cache; refused while requests are in flight (their pages are in use)."""
    st = state_of(request)
    if st.engine.num_in_flight:
        raise APIError(400, f"cannot flush the cache while {st.engine.num_in_flight} requests are running")
    st.engine.flush_cache()
    return Response("Cache flushed.\n", media_type="text/plain")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    st = state_of(request)
    return Response(st.metrics.render(st.engine.stats()), media_type=CONTENT_TYPE)
