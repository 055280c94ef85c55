"""Thin FastAPI routes of ``moetier serve``: read the body, call the serving layer, frame SSE.

All validation lives in ``protocol.py`` (shapes) and ``engine.OpenAIServing`` (model-level
checks); every refusal is a :class:`ServeError` rendered by the handlers in ``app.py`` as
OpenAI's error JSON. A client that disconnects (streaming or not) cancels its request.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from moetier.serve import memory
from moetier.serve.engine import OpenAIServing, RequestHandle
from moetier.serve.metrics import _Family, compute_path_families, model_metrics_snapshot
from moetier.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ServeError,
    parse_request,
)
from moetier.weights.budget import fmt

T = TypeVar("T")


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


async def require_api_key(request: Request) -> None:
    key: str | None = request.app.state.api_key
    if not key:
        return
    if request.url.path == "/metrics" and request.app.state.metrics_public:
        return
    auth = request.headers.get("authorization")
    if not auth:
        raise ServeError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise ServeError(401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key")


class BodyBudget:
    """Bytes that request bodies being read, parsed and prepared may take at once, as charged by
    :func:`moetier.serve.memory.body_cost` (``--request-ram``): request memory stays bounded
    however many connections send bodies together. A request that would exceed it waits its
    turn (503 + Retry-After); one that alone exceeds it is refused (413). Event-loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def check_fits(self, n: int, what: str) -> None:
        """413 for a request that alone would take more than the whole budget."""
        if n > self.capacity:
            raise ServeError(
                413,
                f"This request would take up to {fmt(n)} of memory to parse ({what}); the server's request "
                f"memory is {fmt(self.capacity)} (--request-ram); send a smaller request",
                code="request_too_large",
            )

    def take(self, n: int) -> None:
        if self.used + n > self.capacity:
            raise ServeError(
                503,
                f"The server is busy reading other large requests ({fmt(self.used)} of {fmt(self.capacity)} of "
                "request memory in use); retry later",
                type="server_error",
                code="server_busy",
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


async def read_body(request: Request) -> tuple[bytes, int]:
    """The request body, refusing more than ``app.state.max_body_bytes`` (413), and the bytes
    charged for it in ``app.state.body_budget``: ``BYTES_PER_BODY_BYTE`` per byte as it arrives,
    then the rest of :func:`~moetier.serve.memory.body_cost` (the caller gives them back once
    the request is prepared)."""
    limit: int = request.app.state.max_body_bytes
    budget: BodyBudget = request.app.state.body_budget
    ctype = request.headers.get("content-type", "")
    if ctype.partition(";")[0].strip().lower() != "application/json":
        raise ServeError(
            415,
            f"Content-Type must be application/json, got {ctype or 'none'!r}",
            code="unsupported_media_type",
        )
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ServeError(400, f"Invalid Content-Length header: {cl!r}", code="invalid_request") from None
        if n > limit:
            raise ServeError(413, f"Request body is {n} bytes; the limit is {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = charged = 0
    try:
        async for chunk in request.stream():
            if size + len(chunk) > limit:
                raise ServeError(413, f"Request body exceeds the limit of {limit} bytes", code="request_too_large")
            budget.take(memory.BYTES_PER_BODY_BYTE * len(chunk))
            charged += memory.BYTES_PER_BODY_BYTE * len(chunk)
            size += len(chunk)
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        cost = memory.body_cost(body, request.app.state.serving.backend.context_length)
        budget.check_fits(cost, f"{len(body)} bytes, up to {memory.json_values(body)} JSON values")
        budget.take(cost - charged)
        charged = cost
    except ClientDisconnect:  # gone (or timed out) mid-body: logged as 499, not 500
        budget.give(charged)
        raise ServeError(499, "client disconnected while sending the body", code="client_disconnected") from None
    except BaseException:
        budget.give(charged)
        raise
    return body, charged


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _until_done_or_disconnect(request: Request, handle: RequestHandle, coro: Awaitable[T]) -> T:
    """Await ``coro``; if the client goes away first, cancel the request and stop."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ServeError(499, "client disconnected", code="client_disconnected")
        return work.result()
    finally:
        if not handle.done:
            _serving(request).engine.cancel(handle)
        await _settle(work, gone)


async def _settle(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` and wait until they are done, even while our own task is being cancelled
    (a task left pending is destroyed pending: asyncio's "Task was destroyed but it is pending!")."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    if live:
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*live, return_exceptions=True)


def _sse(request: Request, handle: RequestHandle, chunks: AsyncIterator[str]) -> StreamingResponse:
    serving = _serving(request)

    async def gen() -> AsyncIterator[str]:
        # wait for the next chunk OR the client leaving (also while still queued, before any chunk)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        it = chunks.__aiter__()
        nxt: asyncio.Future[str] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    break
                try:
                    data = nxt.result()
                except StopAsyncIteration:
                    yield "data: [DONE]\n\n"
                    break
                yield f"data: {data}\n\n"
        finally:
            if not handle.done:
                serving.engine.cancel(handle)
            await _settle(nxt, gone)
            with anyio.CancelScope(shield=True):
                await it.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(
        gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": handle.id}
    )


def _note(request: Request, handle: RequestHandle) -> None:
    """Remember the handle so the access log line can show its token counts."""
    request.state.handle = handle


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok", ...}`` while the engine thread runs; 503 with the reason when it is down."""
    eng = _serving(request).engine
    body: dict[str, Any] = {
        "status": "ok", "model": _serving(request).model_name, "waiting": eng.queue_depth, "running": eng.active,
    }
    if eng.restarts:
        body["restarts"] = eng.restarts
    if not eng.alive:
        body["status"] = "error"
        body["reason"] = eng.dead_reason or "the engine is not running"
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


def _request_memory_families(request: Request) -> list[_Family]:
    rm = request.app.state.request_memory
    res = _Family("moetier_request_memory_bytes", "gauge",
                  "Memory reserved for requests by part (inside --max-ram when set; serve/memory.py).")
    for part, v in rm.to_json().items():
        res.add(v, part=part)
    used = _Family("moetier_request_body_memory_in_use_bytes", "gauge",
                   "Request memory charged now to bodies being read and prepared (of the 'bodies' part).")
    return [res, used.add(request.app.state.body_budget.used)]


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(request: Request) -> PlainTextResponse:
    s = _serving(request)
    text = s.engine.metrics.render(
        queue_depth=s.engine.queue_depth,
        active=s.engine.active,
        max_queue=s.engine.max_queue,
        max_batch=s.engine.max_batch,
        model_name=s.model_name,
        model_metrics=model_metrics_snapshot(s.backend.model),
        kv_cache_bytes=s.engine.kv_bytes(),
        extra=lambda: [
            _Family("moetier_engine_up", "gauge", "1 while the engine thread runs, 0 while it is down.").add(
                int(s.engine.alive)
            ),
            _Family("moetier_engine_restarts_total", "counter", "Engine thread restarts.").add(s.engine.restarts),
            *compute_path_families(s.backend.model),
            *_request_memory_families(request),
        ],
    )
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    s = _serving(request)
    return ModelList(data=[ModelCard(id=s.model_name, max_model_len=s.backend.context_length)]).model_dump()


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    s = _serving(request)
    s.check_model(model_id)
    return ModelCard(id=s.model_name, max_model_len=s.backend.context_length).model_dump()


async def _read_and_prepare(request: Request, fn: Any) -> Any:
    """Read the body, then run ``fn(serving, body)`` -- the CPU-heavy part: JSON parsing and
    validation of large bodies, template rendering, tokenisation -- on the app's small worker
    pool: the event loop keeps streaming to everyone else, and at most ``cpu_limiter.total_tokens``
    requests are being prepared at once. The body counts in the body budget until then."""
    body, charged = await read_body(request)
    try:
        return await anyio.to_thread.run_sync(fn, _serving(request), body, limiter=request.app.state.cpu_limiter)
    finally:
        request.app.state.body_budget.give(charged)


def _prepare_completion(s: OpenAIServing, body: bytes) -> tuple[CompletionRequest, Any]:
    req = parse_request(body, CompletionRequest)
    prep = s.prepare_completion(req)
    req.prompt = ""  # the input is not kept while the request waits and runs (serve/memory.py)
    return req, prep


def _prepare_chat(s: OpenAIServing, body: bytes) -> tuple[ChatCompletionRequest, Any]:
    req = parse_request(body, ChatCompletionRequest, max_messages=s.backend.context_length)
    prep = s.prepare_chat(req)
    req.messages = []  # the input is not kept while the request waits and runs (serve/memory.py)
    return req, prep


@router.post("/v1/completions", dependencies=[Depends(require_api_key)])
async def completions(request: Request) -> Any:
    s = _serving(request)
    req, prep = await _read_and_prepare(request, _prepare_completion)
    handle = s.submit(prep, f"cmpl-{uuid.uuid4().hex}")
    del prep  # the handle holds the prompt ids from here
    _note(request, handle)
    if req.stream:
        return _sse(request, handle, s.completion_stream(req, handle))
    resp = await _until_done_or_disconnect(request, handle, s.completion(req, handle))
    return JSONResponse(resp.model_dump())


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def chat_completions(request: Request) -> Any:
    s = _serving(request)
    req, prep = await _read_and_prepare(request, _prepare_chat)
    handle = s.submit(prep, f"chatcmpl-{uuid.uuid4().hex}")
    del prep
    _note(request, handle)
    if req.stream:
        return _sse(request, handle, s.chat_stream(req, handle))
    resp = await _until_done_or_disconnect(request, handle, s.chat(req, handle))
    return JSONResponse(resp.model_dump())
