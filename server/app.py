"""The FastAPI application of ``dsv serve``: wiring, authentication, limits and the error shape.

Routes live in ``routes_openai.py`` and ``routes_chat.py`` (``/v1/*``) and ``routes_native.py`` (SGLang's native endpoints);
they reach shared state through :class:`ServerState` on ``app.state.dsv``.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from dsv.server.engine_client import AsyncEngine, EngineUnavailable, QueueFull
from dsv.server.metrics import ServerMetrics
from dsv.server.openai_protocol import APIError, error_body

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


@dataclass
class ServerState:
    """What the routes share."""

    engine: AsyncEngine
    tokenizer: Any
    served_model_name: str
    model_path: str | None = None
    tokenizer_path: str | None = None
    server_args: dict[str, Any] = field(default_factory=dict)
    metrics: ServerMetrics | None = None


def state_of(request: Request) -> ServerState:
    return request.app.state.dsv


def _json_error(status: int, message: str, param: str | None = None, code: Any = None) -> JSONResponse:
    body = error_body(message, _STATUS_TYPES.get(status, "server_error"), param, code or status)
    return JSONResponse(body, status_code=status)


class _GateMiddleware:
    """Bearer-token check and body-size limit, before any route runs.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``: the latter wraps streaming responses in a
    way that hides client disconnects from them, and disconnects must abort requests.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                resp = _json_error(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return await resp(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            msg = f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes} bytes"
            return await _json_error(413, msg)(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT"):
            receive = self._limited(receive)
        await self.app(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        # A chunked body has no Content-Length: count as it arrives.
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        return wrapped


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        body = exc.body()
        body["error"]["code"] = exc.code or exc.status
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return _json_error(422, msg or "invalid request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return _json_error(503, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(_: Request, exc: QueueFull) -> JSONResponse:
        return _json_error(429, str(exc))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _json_error(400, str(exc))


def create_app(
    engine_client: AsyncEngine,
    tokenizer: Any,
    served_model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = 32 * 2**20,
    model_path: str | None = None,
    tokenizer_path: str | None = None,
    server_args: dict[str, Any] | None = None,
    manage_engine: bool = True,
) -> FastAPI:
    """Build the app around a started-or-not :class:`AsyncEngine`.

    With ``manage_engine`` the app's lifespan starts the engine thread and shuts it down (aborting
    whatever is still in flight) when the server stops.
    """
    from dsv.server import routes_chat, routes_native, routes_openai

    if engine_client.metrics is None:
        engine_client.metrics = ServerMetrics(served_model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if manage_engine:
            await engine_client.start()
        try:
            yield
        finally:
            if manage_engine:
                await engine_client.shutdown()

    app = FastAPI(
        title="dsv",
        description="DeepSeek-V3.2 inference server (OpenAI-compatible and SGLang-native endpoints)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.dsv = ServerState(
        engine_client,
        tokenizer,
        served_model_name,
        model_path,
        tokenizer_path,
        dict(server_args or {}),
        engine_client.metrics,
    )
    app.add_middleware(_GateMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    _install_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_native.router)
    return app
