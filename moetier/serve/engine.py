"""Serving logic of ``moetier serve``: the continuous-batching engine and the OpenAI layer.

:class:`Engine` owns the model on ONE thread. Requests wait in a bounded queue
(:class:`QueueFull` when it is full); each engine step admits waiting requests up to
``max_batch`` running sequences and runs, as one flat forward through the runtime's step API,
every new request's prompt (prefill, chunked to ``max_step_tokens``) together with every
running sequence's next decode token. Tokens of different requests routed to the same expert
are therefore computed together (the runtime groups the flat batch by expert). Each request
samples with its own parameters and its own seeded generator, so its output does not depend
on what else is in the batch (exactly so in float32; in bfloat16 the runtime's logits move by
~1e-2 with the batch composition, enough to flip near-ties). A cancelled request (client
disconnect) leaves the batch at the next step boundary and its sequence (KV cache) is freed.

:class:`OpenAIServing` turns protocol requests into engine requests (chat template,
tokenisation, context checks) and engine events into OpenAI responses / stream chunks. The
FastAPI routes (``routes.py``) only read bodies and call it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moetier.errors import MoetierError
from moetier.generation import Sampler, SamplingParams, TextStream
from moetier.serve.metrics import ServeMetrics
from moetier.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ServeError,
    Usage,
    error_body,
)

log = logging.getLogger("moetier.serve")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # cap when a chat request gives no max_tokens
GATE_CHARS = 16384  # inputs longer than this are token-counted in pieces before being encoded whole


# --------------------------------------------------------------------------- backend


class ModelBackend:
    """The surface of a runtime :class:`moetier.runtime.Model` the engine uses.

    ``new_sequence()`` -> a sequence owning its KV cache; ``step([(seq, ids), ...])`` -> one
    row of next-token logits per item (float32 [vocab]) from ONE flat forward;
    ``free(seq)`` drops its KV cache. Tests subclass it to slow steps down or inject faults.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        spec = model.spec
        # the longest sequence: the model's window, or the --context a --max-ram budget reserved KV for
        self.context_length = int(getattr(model, "context_limit", spec.max_position_embeddings))
        self.vocab_size = int(spec.vocab_size)
        self.eos_ids = frozenset(int(t) for t in self.tokenizer.eos_token_ids)

    def new_sequence(self, capacity: int) -> Any:
        return self.model.new_sequence(capacity=capacity)

    def step(self, batch: Sequence[tuple[Any, Sequence[int]]]) -> torch.Tensor:
        return self.model.step(batch)

    def free(self, seq: Any) -> None:
        seq.layers = [None] * len(seq.layers)
        seq.length = 0
        seq.tokens.clear()

    @staticmethod
    def kv_bytes(seq: Any) -> int:
        n = 0
        for entry in list(getattr(seq, "layers", None) or ()):
            for t in entry if isinstance(entry, (tuple, list)) else (entry,):
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
        return n

    def encode(self, text: str) -> list[int]:
        return list(self.model.encode_prompt(text))

    @property
    def max_token_chars(self) -> int:
        """No token covers more input characters than this (see Tokenizer.max_token_chars)."""
        return int(self.tokenizer.max_token_chars)

    def count_tokens_upto(self, text: str, limit: int) -> int:
        """Approximate token count of ``text``, stopping once past ``limit`` (bounded work)."""
        return int(self.tokenizer.count_tokens_upto(text, limit))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.model.encode_prompt(messages))


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class RequestParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def sampler(self) -> Sampler:
        """The runtime's sampler (the same one ``Model.generate`` uses), seeded per request."""
        return Sampler(SamplingParams(self.temperature, self.top_k, self.top_p, self.seed))


# --------------------------------------------------------------------------- events


@dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # held-back text flushed at the end
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Failed:
    message: str
    status: int = 500  # 503: the engine is down or shutting down (retry later)


Event = Delta | Finished | Failed


class QueueFull(Exception):
    pass


class EngineUnavailable(Exception):
    """The engine thread is down (crashed, restarting) or the server is shutting down."""


class RequestHandle:
    """One submitted generation; iterate it (async) for its events."""

    def __init__(self, rid: str, prompt_ids: Sequence[int], params: RequestParams, loop: asyncio.AbstractEventLoop):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.submitted = time.monotonic()

    def _post(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # event loop closed (server shutting down)
            pass

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.queue.get()
            yield ev
            if not isinstance(ev, Delta):
                return


@dataclass
class _Running:
    handle: RequestHandle
    seq: Any
    pending: list[int]  # tokens to feed next step (rest of the prompt, or the last sampled token)
    sampler: Sampler
    stream: TextStream
    out_ids: list[int] = field(default_factory=list)  # generated ids, EOS included
    emitted_tokens: int = 0


class Engine:
    """Continuous batching at decode-step granularity on one thread that owns the model."""

    def __init__(
        self,
        backend: ModelBackend,
        *,
        max_queue: int = 64,
        max_batch: int = 16,
        max_step_tokens: int = 2048,
        metrics: ServeMetrics | None = None,
        max_restarts: int = 5,
        restart_delay: float = 1.0,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or max_step_tokens < 1:
            raise MoetierError("--max-queue, --max-batch and max_step_tokens must be at least 1")
        self.backend = backend
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_step_tokens = max_step_tokens
        self.metrics = metrics or ServeMetrics()
        self._cond = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: list[_Running] = []
        self._n_running = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._ids = itertools.count()
        self.max_restarts = max_restarts
        self.restart_delay = restart_delay
        self.restarts = 0
        self.dead_reason: str | None = None  # why the engine thread is down (None while it runs)
        self._drain_until: float | None = None  # monotonic deadline once draining (shutdown)

    # ---- lifecycle
    def start(self) -> None:
        """Start the engine thread and its supervisor, which restarts it (up to ``max_restarts``
        times, ``restart_delay`` apart) if it ever dies; while it is down every request gets 503."""
        if self._supervisor is None:
            self._spawn()
            self._supervisor = threading.Thread(target=self._supervise, name="moetier-engine-supervisor", daemon=True)
            self._supervisor.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in (self._thread, self._supervisor):
            if t is not None:
                t.join(timeout)
        self._thread = self._supervisor = None

    def drain(self, seconds: float) -> None:
        """Shutdown: refuse new requests (503), answer the waiting ones 503 now, let the running
        ones finish for up to ``seconds``, then end them with a 503 error (a stream gets an
        error chunk and ``[DONE]``)."""
        with self._cond:
            self._drain_until = time.monotonic() + max(0.0, seconds)
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for h in waiting:
            h.done = True
            h.finish_reason = "error"
            h._post(Failed("the server is shutting down; retry later", 503))

    @property
    def alive(self) -> bool:
        t = self._thread
        return self.dead_reason is None and t is not None and t.is_alive()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moetier-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """The engine thread: the loop, and if anything escapes it, say why and fail every request."""
        try:
            self._loop()
        except BaseException as e:  # the thread is dying: tell everyone why
            log.critical("the engine thread died", exc_info=True)
            self.metrics.observe_engine_error()
            self._fail_all(f"the engine thread died ({type(e).__name__}: {e})")

    def _fail_all(self, reason: str) -> None:
        """Mark the engine down and answer every running and waiting request with 503."""
        with self._cond:
            self.dead_reason = reason
            running, self._running = self._running, []
            waiting = list(self._waiting)
            self._waiting.clear()
            self._n_running = 0
        msg = f"the engine is unavailable: {reason}; retry later"
        for r in running:
            if not r.handle.done:
                self._finish(r, Failed(msg, 503))
        for h in waiting:
            h.done = True
            h.finish_reason = "error"
            h._post(Failed(msg, 503))

    def _supervise(self) -> None:
        while True:
            t = self._thread
            if t is not None:
                t.join()
            with self._cond:
                if self._stop:
                    return
            if self.dead_reason is None:  # ended without an exception we saw
                self._fail_all("the engine thread exited unexpectedly")
            if self.restarts >= self.max_restarts:
                log.critical("engine down for good after %d restarts: %s", self.restarts, self.dead_reason)
                return
            with self._cond:
                self._cond.wait_for(lambda: self._stop, timeout=self.restart_delay)
                if self._stop:
                    return
                self.restarts += 1
                log.warning("restarting the engine thread (restart %d of %d)", self.restarts, self.max_restarts)
                self.dead_reason = None
                self._spawn()

    # ---- client side (event-loop thread)
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._n_running

    def submit(self, prompt_ids: list[int], params: RequestParams, rid: str | None = None) -> RequestHandle:
        loop = asyncio.get_running_loop()
        # 4 bytes per id while waiting (a list of Python ints takes ~40): see serve/memory.py
        handle = RequestHandle(rid or f"req-{next(self._ids)}", array.array("i", prompt_ids), params, loop)
        with self._cond:
            if self._stop or self._drain_until is not None:
                raise EngineUnavailable("the server is shutting down")
            if self.dead_reason is not None:
                raise EngineUnavailable(f"the engine is unavailable: {self.dead_reason}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Drop a request (client went away); its sequence is freed at the next step boundary."""
        if handle.done:
            return
        handle.cancelled = True
        handle.finish_reason = "cancelled"
        with self._cond:
            try:
                self._waiting.remove(handle)
                handle.done = True
                handle.finish_reason = "cancelled"
                self.metrics.observe_finished("cancelled")
            except ValueError:
                pass
            self._cond.notify_all()

    # ---- engine thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                if self._drain_until is not None and time.monotonic() >= self._drain_until:
                    for r in self._running:
                        self._finish(r, Failed("the server is shutting down (drain timeout); retry later", 503))
                    self._running = []
                    self._n_running = 0
                    continue
                while self._waiting and len(self._running) < self.max_batch:
                    h = self._waiting.popleft()
                    self._admit(h)
                self._n_running = len(self._running)
            self._reap_cancelled()
            if self._running:
                self._step()
            self._n_running = len(self._running)
        for r in self._running:
            self._finish(r, Failed("the server is shutting down", 503))
        self._running.clear()
        while self._waiting:
            h = self._waiting.popleft()
            h.done = True
            h._post(Failed("the server is shutting down", 503))

    def _admit(self, h: RequestHandle) -> None:
        p = h.params
        try:
            sampler = p.sampler()
            seq = self.backend.new_sequence(len(h.prompt_ids) + p.max_tokens)
        except Exception as e:
            log.exception("could not start request %s", h.id)
            h.done = True
            h.finish_reason = "error"
            h._post(Failed(f"could not start the sequence: {type(e).__name__}: {e}"))
            return
        self.metrics.observe_admitted(len(h.prompt_ids))
        self._running.append(_Running(h, seq, list(h.prompt_ids), sampler, TextStream(self.backend.decode, p.stop)))

    def _free(self, r: _Running) -> None:
        try:
            self.backend.free(r.seq)
        except Exception:  # pragma: no cover
            log.exception("freeing a sequence failed")
        r.seq = None
        self.metrics.observe_freed()

    def _finish(self, r: _Running, ev: Event) -> None:
        self._free(r)
        r.handle.done = True
        r.handle.completion_tokens = len(r.out_ids)
        r.handle.finish_reason = ev.reason if isinstance(ev, Finished) else "error"
        if isinstance(ev, Finished):
            self.metrics.observe_finished(ev.reason)
        r.handle._post(ev)

    def _reap_cancelled(self) -> None:
        keep = []
        for r in self._running:
            if r.handle.cancelled:
                self._free(r)
                r.handle.done = True
                r.handle.finish_reason = "cancelled"
                r.handle.completion_tokens = len(r.out_ids)
                self.metrics.observe_finished("cancelled")
            else:
                keep.append(r)
        self._running = keep

    def _step(self) -> None:
        budget = self.max_step_tokens
        batch: list[tuple[_Running, list[int]]] = []
        # decodes first (1 token each), then prefill chunks within the token budget
        for r in sorted(self._running, key=lambda r: len(r.pending) > 1):
            n = len(r.pending)
            if n > 1:
                if budget <= 0:
                    continue
                n = min(n, budget)
            batch.append((r, r.pending[:n]))
            budget -= n
        t0 = time.perf_counter()
        try:
            logits = self.backend.step([(r.seq, ids) for r, ids in batch])
        except Exception as e:
            log.exception("engine step failed; failing its %d requests", len(batch))
            self.metrics.observe_engine_error()
            failed = {id(r) for r, _ in batch}
            for r, _ in batch:
                self._finish(r, Failed(f"internal error during generation: {type(e).__name__}: {e}"))
            self._running = [r for r in self._running if id(r) not in failed]
            return
        dt = time.perf_counter() - t0
        generated = 0
        ntok = 0
        done: set[int] = set()
        for (r, ids), row in zip(batch, logits):
            ntok += len(ids)
            r.pending = r.pending[len(ids) :]
            if r.pending:  # prefill chunk; the prompt is not finished yet
                continue
            try:  # a failure here concerns this request only
                tok = int(r.sampler(row[None])[0])
                generated += 1
                finished = self._advance(r, tok)
            except Exception as e:
                log.exception("sampling/detokenising failed for %s; failing it alone", r.handle.id)
                self.metrics.observe_engine_error()
                if not r.handle.done:
                    self._finish(r, Failed(f"internal error during generation: {type(e).__name__}: {e}"))
                finished = True
            if finished:
                done.add(id(r))
            else:
                r.pending = [tok]
        self.metrics.observe_step(len(batch), ntok, generated, dt)
        if done:
            self._running = [r for r in self._running if id(r) not in done]

    def _advance(self, r: _Running, tok: int) -> bool:
        """Record one sampled token; emit text; return True when the request finished."""
        p = r.handle.params
        r.out_ids.append(tok)
        reason = None
        text = ""
        if tok in self.backend.eos_ids:
            reason = "stop"
        else:
            text = r.stream.push(tok)
            if r.stream.stopped:
                reason = "stop"
            elif len(r.out_ids) >= p.max_tokens:
                reason = "length"
            elif len(r.handle.prompt_ids) + len(r.out_ids) >= self.backend.context_length:
                reason = "length"
        new_ids = r.out_ids[r.emitted_tokens :]
        r.emitted_tokens = len(r.out_ids)
        if reason is not None:
            if not r.stream.stopped:
                text += r.stream.flush()
            self._finish(r, Finished(reason, len(r.handle.prompt_ids), len(r.out_ids), text, new_ids))
            return True
        r.handle._post(Delta(text, new_ids))
        return False

    def kv_bytes(self) -> int:
        """KV-cache bytes held by running sequences (read from another thread: approximate)."""
        return sum(self.backend.kv_bytes(r.seq) for r in list(self._running) if r.seq is not None)


# --------------------------------------------------------------------------- OpenAI layer


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: RequestParams


class OpenAIServing:
    """Protocol requests -> engine requests, engine events -> OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.backend = engine.backend
        self.model_name = model_name

    # ---- validation shared by both endpoints
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ServeError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _params(self, req: Any, prompt_len: int, max_tokens: int | None, default: int, param: str) -> RequestParams:
        ctx = self.backend.context_length
        room = ctx - prompt_len
        take = "take" if param == "messages" else "takes"
        if room < 1:
            raise ServeError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the {param} {take} {prompt_len} "
                "tokens (no room to generate); shorten the input.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default, room)
        elif max_tokens > room:
            which = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise ServeError(
                400,
                f"This model's maximum context length is {ctx} tokens; the {param} {take} {prompt_len} tokens "
                f"and {which}={max_tokens} asks for more than the {room} that remain.",
                param=which,
                code="context_length_exceeded",
            )
        return RequestParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=tuple(req.stop_list()),
        )

    def check_length(self, texts: Sequence[str], param: str) -> None:
        """Refuse input that cannot fit the context BEFORE encoding it whole, so the memory and
        time a request costs are bounded by the context window, not by the body: more characters
        than ``context x max_token_chars`` cannot fit at all; a long text is then counted in
        pieces, stopping past twice the context (the pieces' count is an estimate; the exact
        check follows the whole encoding)."""
        ctx = self.backend.context_length
        per = self.backend.max_token_chars
        n = sum(len(t) for t in texts)
        if n > ctx * per:
            raise ServeError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the {param} has {n} characters, "
                f"more than {ctx * per} (no token of this model covers more than {per} characters); "
                "shorten the input.",
                param=param,
                code="context_length_exceeded",
            )
        if n > GATE_CHARS:
            limit, counted = 2 * ctx, 0
            for t in texts:
                counted += self.backend.count_tokens_upto(t, limit - counted)
                if counted > limit:
                    raise ServeError(
                        400,
                        f"This model's maximum context length is {ctx} tokens, but the {param} takes more than "
                        f"{limit} tokens; shorten the input.",
                        param=param,
                        code="context_length_exceeded",
                    )

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self.check_model(req.model)
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            if not prompt:
                raise ServeError(
                    400, "Invalid value for 'prompt': must not be empty", param="prompt", code="invalid_value"
                )
            self.check_length([prompt], "prompt")
            ids = self.backend.encode(prompt)
        else:
            vs = self.backend.vocab_size
            bad = [t for t in prompt if t < 0 or (vs is not None and t >= vs)]
            if bad:
                raise ServeError(
                    400,
                    f"Invalid value for 'prompt': token id {bad[0]} is outside the vocabulary [0, {vs})",
                    param="prompt",
                    code="invalid_value",
                )
            ids = list(prompt)
        if not ids:
            raise ServeError(
                400, "Invalid value for 'prompt': it encodes to no tokens", param="prompt", code="invalid_value"
            )
        return Prepared(ids, self._params(req, len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt"))

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self.check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        self.check_length([m["content"] for m in messages], "messages")
        try:
            ids = self.backend.chat_prompt(messages)
        except (MoetierError, ValueError, TypeError, KeyError) as e:
            raise ServeError(
                400, f"Invalid value for 'messages': {e}", param="messages", code="invalid_value"
            ) from None
        return Prepared(ids, self._params(req, len(ids), req.max_new_tokens(), DEFAULT_CHAT_TOKENS, "messages"))

    def submit(self, prep: Prepared, rid: str) -> RequestHandle:
        try:
            return self.engine.submit(prep.prompt_ids, prep.params, rid)
        except EngineUnavailable as e:
            self.engine.metrics.observe_rejected("unavailable")
            raise ServeError(503, f"{e}; retry later", type="server_error", code="engine_unavailable") from None
        except QueueFull as e:
            self.engine.metrics.observe_rejected("queue_full")
            raise ServeError(
                429, f"Too many requests: {e}; retry later", type="rate_limit_exceeded", code="rate_limit_exceeded"
            ) from None

    # ---- whole responses
    async def collect(self, handle: RequestHandle) -> tuple[str, list[int], Finished]:
        parts: list[str] = []
        ids: list[int] = []
        async for ev in handle.events():
            if isinstance(ev, Delta):
                parts.append(ev.text)
                ids.extend(ev.token_ids)
            elif isinstance(ev, Finished):
                parts.append(ev.text)
                ids.extend(ev.token_ids)
                return "".join(parts), ids, ev
            else:
                code = "engine_unavailable" if ev.status == 503 else "internal_error"
                raise ServeError(ev.status, ev.message, type="server_error", code=code)
        raise ServeError(500, "generation ended without a result", type="server_error")  # pragma: no cover

    @staticmethod
    def usage(fin: Finished) -> Usage:
        return Usage(
            prompt_tokens=fin.prompt_tokens,
            completion_tokens=fin.completion_tokens,
            total_tokens=fin.prompt_tokens + fin.completion_tokens,
        )

    async def completion(self, req: CompletionRequest, handle: RequestHandle) -> CompletionResponse:
        text, ids, fin = await self.collect(handle)
        return CompletionResponse(
            id=handle.id,
            model=self.model_name,
            choices=[
                CompletionChoice(text=text, finish_reason=fin.reason, token_ids=ids if req.return_token_ids else None)
            ],
            usage=self.usage(fin),
        )

    async def chat(self, req: ChatCompletionRequest, handle: RequestHandle) -> ChatCompletionResponse:
        text, ids, fin = await self.collect(handle)
        return ChatCompletionResponse(
            id=handle.id,
            model=self.model_name,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text),
                    finish_reason=fin.reason,
                    token_ids=ids if req.return_token_ids else None,
                )
            ],
            usage=self.usage(fin),
        )

    # ---- streams (yield JSON strings; routes frame them as SSE)
    async def completion_stream(self, req: CompletionRequest, handle: RequestHandle) -> AsyncIterator[str]:
        created = int(time.time())
        want_ids = req.return_token_ids

        def chunk(text: str, ids: list[int], reason: str | None) -> str:
            return CompletionResponse(
                id=handle.id,
                created=created,
                model=self.model_name,
                choices=[CompletionChoice(text=text, finish_reason=reason, token_ids=ids if want_ids else None)],
            ).model_dump_json()

        async for ev in handle.events():
            if isinstance(ev, Delta):
                if ev.text or want_ids:
                    yield chunk(ev.text, ev.token_ids, None)
            elif isinstance(ev, Finished):
                yield chunk(ev.text, ev.token_ids, ev.reason)
                if req.include_usage():
                    yield CompletionResponse(
                        id=handle.id, created=created, model=self.model_name, choices=[], usage=self.usage(ev)
                    ).model_dump_json()
            else:
                yield _stream_error(ev)

    async def chat_stream(self, req: ChatCompletionRequest, handle: RequestHandle) -> AsyncIterator[str]:
        created = int(time.time())
        want_ids = req.return_token_ids

        def chunk(delta: DeltaMessage, ids: list[int] | None, reason: str | None) -> str:
            return ChatCompletionChunk(
                id=handle.id,
                created=created,
                model=self.model_name,
                choices=[ChatChunkChoice(delta=delta, finish_reason=reason, token_ids=ids if want_ids else None)],
            ).model_dump_json()

        yield chunk(DeltaMessage(role="assistant", content=""), [] if want_ids else None, None)
        async for ev in handle.events():
            if isinstance(ev, Delta):
                if ev.text or want_ids:
                    yield chunk(DeltaMessage(content=ev.text), ev.token_ids, None)
            elif isinstance(ev, Finished):
                yield chunk(DeltaMessage(content=ev.text or None), ev.token_ids, ev.reason)
                if req.include_usage():
                    yield ChatCompletionChunk(
                        id=handle.id, created=created, model=self.model_name, choices=[], usage=self.usage(ev)
                    ).model_dump_json()
            else:
                yield _stream_error(ev)


def _stream_error(ev: Failed) -> str:
    code = "engine_unavailable" if ev.status == 503 else "internal_error"
    return json.dumps(error_body(ev.message, type="server_error", code=code))
