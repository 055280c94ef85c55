"""Thin FastAPI routes of ``moetier serve``: read the body, call the serving layer, frame SSE.

All validation lives in ``protocol.py`` (shapes) and ``engine.OpenAIServing`` (model-level
checks); every refusal is a :class:`ServeError` rendered by the handlers in ``app.py`` as
OpenAI's error JSON. A client that disconnects (streaming or not) cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from moetier.serve.engine import OpenAIServing, RequestHandle
from moetier.serve.metrics import compute_path_families, model_metrics_snapshot
from moetier.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ServeError,
    parse_request,
)

T = TypeVar("T")


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


async def require_api_key(request: Request) -> None:
    key: str | None = request.app.state.api_key
    if not key:
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


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than ``app.state.max_body_bytes`` (413)."""
    limit: int = request.app.state.max_body_bytes
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ServeError(400, f"Invalid Content-Length header: {cl!r}", code="invalid_request") from None
        if n > limit:
            raise ServeError(413, f"Request body is {n} bytes; the limit is {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"Request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


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
            _serving(request).engine.cancel(handle)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ServeError(499, "client disconnected", code="client_disconnected")
        return work.result()
    finally:
        gone.cancel()
        if not handle.done:
            _serving(request).engine.cancel(handle)


def _sse(request: Request, handle: RequestHandle, chunks: AsyncIterator[str]) -> StreamingResponse:
    serving = _serving(request)

    async def gen() -> AsyncIterator[str]:
        # wait for the next chunk OR the client leaving (also while still queued, before any chunk)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        it = chunks.__aiter__()
        try:
            while True:
                nxt = asyncio.ensure_future(it.__anext__())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    break
                try:
                    data = nxt.result()
                except StopAsyncIteration:
                    yield "data: [DONE]\n\n"
                    break
                yield f"data: {data}\n\n"
        finally:
            gone.cancel()
            if not handle.done:
                serving.engine.cancel(handle)

    return StreamingResponse(
        gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": handle.id}
    )


def _note(request: Request, handle: RequestHandle) -> None:
    """Remember the handle so the access log line can show its token counts."""
    request.state.handle = handle


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    eng = _serving(request).engine
    return {"status": "ok", "model": _serving(request).model_name, "waiting": eng.queue_depth, "running": eng.active}


@router.get("/metrics")
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
        extra=lambda: compute_path_families(s.backend.model),
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


@router.post("/v1/completions", dependencies=[Depends(require_api_key)])
async def completions(request: Request) -> Any:
    s = _serving(request)
    req = parse_request(await read_body(request), CompletionRequest)
    prep = await run_in_threadpool(s.prepare_completion, req)  # tokenising may take a while
    handle = s.submit(prep, f"cmpl-{uuid.uuid4().hex}")
    _note(request, handle)
    if req.stream:
        return _sse(request, handle, s.completion_stream(req, handle))
    resp = await _until_done_or_disconnect(request, handle, s.completion(req, handle))
    return JSONResponse(resp.model_dump())


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def chat_completions(request: Request) -> Any:
    s = _serving(request)
    req = parse_request(await read_body(request), ChatCompletionRequest)
    prep = await run_in_threadpool(s.prepare_chat, req)
    handle = s.submit(prep, f"chatcmpl-{uuid.uuid4().hex}")
    _note(request, handle)
    if req.stream:
        return _sse(request, handle, s.chat_stream(req, handle))
    resp = await _until_done_or_disconnect(request, handle, s.chat(req, handle))
    return JSONResponse(resp.model_dump())
