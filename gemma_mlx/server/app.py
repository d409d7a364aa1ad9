"""The HTTP layer: a Starlette app with OpenAI's and Anthropic's endpoints over an `Engine`.

It never runs MLX: requests are validated here, rendered to token ids in a worker thread, handed
to the engine, and answered from the engine's event stream (whole, or as server-sent events).
Every endpoint but `/health` checks the API key (constant-time); bodies above the limit get 413;
errors come in the shape of the API the route belongs to, never with a traceback; one log line
per request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma_mlx.server import anthropic_api, openai_api
from gemma_mlx.server.engine import (
    Engine,
    EngineClosedError,
    GenerationRequest,
    QueueFullError,
    RequestStream,
)
from gemma_mlx.server.errors import APIError, from_validation, invalid
from gemma_mlx.server.prompts import ServedModel
from gemma_mlx.server.replies import collect, finish_error
from gemma_mlx.server.tools import ReplyParser

log = logging.getLogger("gemma_mlx.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_DRAIN_FACTOR = 16  # read (and drop) up to this many times the limit before answering 413
_LOG = "gemma_mlx.log"  # scope key: what the request's log line reports besides method and status


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(error: APIError, path: str) -> JSONResponse:
    body = error.anthropic() if is_anthropic(path) else error.openai()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class Gate:
    """ASGI middleware: the API key on every route but /health, and the per-request log line."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers", []))
        bearer = headers.get(b"authorization", b"")
        offered = bearer[7:] if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(offered, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        try:
            if self.api_key and path != "/health" and not self._authorized(scope):
                error = APIError(401, "invalid or missing API key (Authorization: Bearer KEY or "
                                 "x-api-key: KEY)", code="invalid_api_key")  # fmt: skip
                await error_response(error, path)(scope, receive, watch)
            else:
                await self.app(scope, receive, watch)
        finally:
            note = scope.get(_LOG, "")
            client = scope.get("client") or ("-", 0)
            log.info(
                "%s %s %s %d %.3fs%s", client[0], scope["method"], path, status,
                time.perf_counter() - start, note,
            )  # fmt: skip


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 above `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            if size > _DRAIN_FACTOR * limit:
                break
            continue  # drain, so the client reads our answer instead of a reset connection
        chunks.append(chunk)
    if too_big:
        raise APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)")
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from e


def submit(engine: Engine, request: GenerationRequest) -> RequestStream:
    try:
        return engine.submit(request)
    except QueueFullError as e:
        raise APIError(
            429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
            headers={"Retry-After": str(e.retry_after)},
        ) from e  # fmt: skip
    except EngineClosedError as e:
        raise APIError(503, str(e)) from e


async def until_disconnect(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """(finished, result) of `work`, cancelled when the client goes away first."""
    result: list[Any] = []

    async with anyio.create_task_group() as group:

        async def run() -> None:
            result.append(await work)
            group.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    return bool(result), result[0] if result else None


def _note(request: Request, stream: RequestStream) -> None:
    """Put the request's token counts on its log line once it has finished."""
    finish = stream.finish
    if finish is None:  # the client went away first
        request.scope[_LOG] = f" prompt={len(stream.request.prompt)} finish=cancelled"
        return
    u = finish.usage
    request.scope[_LOG] = (
        f" prompt={u.prompt_tokens} cached={u.cached_tokens} "
        f"completion={u.completion_tokens} finish={finish.reason}"
    )


def event_stream(
    request: Request, stream: RequestStream, chunks: AsyncIterator[str]
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # also when the client went away: stop the generation at its next step
            stream.cancel()
            _note(request, stream)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


class Routes:
    """The endpoints, over one engine and one served model."""

    def __init__(self, engine: Engine, served: ServedModel, max_body_bytes: int):
        self.engine = engine
        self.served = served
        self.max_body_bytes = max_body_bytes
        self.closing = False

    async def _prepare(self, request: Request, model: type[BaseModel], prepare: Callable):
        params = parse(model, await read_json(request, self.max_body_bytes))
        return await run_in_threadpool(prepare, params, self.served)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.ChatRequest, openai_api.prepare_chat, True)

    async def completions(self, request: Request) -> Response:
        prepare = openai_api.prepare_completion
        return await self._openai(request, openai_api.CompletionRequest, prepare, False)

    async def _openai(self, request: Request, model, prepare, chat: bool) -> Response:
        prepared = await self._prepare(request, model, prepare)
        stream = submit(self.engine, prepared.generation)
        parser = ReplyParser(self.served.tokenizer, prepared.generation.prompt)
        answer = openai_api.Answer(prepared, chat)
        if prepared.stream:
            return event_stream(request, stream, answer.stream(stream, parser))
        done, reply = await until_disconnect(request, collect(stream, parser, prepared.logprobs))
        stream.cancel()
        _note(request, stream)
        if not done:
            return Response(status_code=499)
        error = finish_error(reply.finish)
        if error is not None:
            raise error
        return JSONResponse(answer.body(reply))

    async def messages(self, request: Request) -> Response:
        prepared = await self._prepare(
            request, anthropic_api.MessagesRequest, anthropic_api.prepare
        )
        stream = submit(self.engine, prepared.generation)
        parser = ReplyParser(self.served.tokenizer, prepared.generation.prompt)
        answer = anthropic_api.Answer(prepared)
        if prepared.stream:
            return event_stream(request, stream, answer.stream(stream, parser))
        done, body = await until_disconnect(request, answer.body(stream, parser))
        stream.cancel()
        _note(request, stream)
        if not done:
            return Response(status_code=499)
        if not isinstance(body, dict):
            raise finish_error(body)
        return JSONResponse(body)

    async def models(self, request: Request) -> Response:
        created = self.served.created
        if "anthropic-version" in request.headers:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
            data = [{"type": "model", "id": n, "display_name": n, "created_at": stamp}
                    for n in self.served.names]  # fmt: skip
            return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"],
                                 "last_id": data[-1]["id"]})  # fmt: skip
        data = [{"id": n, "object": "model", "created": created, "owned_by": "gemma_mlx"}
                for n in self.served.names]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.served.check_name(name, param="model")
        return JSONResponse({"id": name, "object": "model", "created": self.served.created,
                             "owned_by": "gemma_mlx"})  # fmt: skip

    async def health(self, request: Request) -> Response:
        if self.closing:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}
    text = message.get(exc.status_code, str(exc.detail))
    return error_response(APIError(exc.status_code, text), request.url.path)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc)
    return error_response(
        APIError(500, "internal server error (see the server log)"), request.url.path
    )


def create_app(
    engine: Engine,
    served: ServedModel,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> tuple[ASGIApp, Routes]:
    """The ASGI app and its routes object (whose `closing` flag /health reports)."""
    routes = Routes(engine, served, max_body_bytes)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/messages", routes.messages, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{name:path}", routes.model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
    return Gate(app, api_key), routes
