"""The OpenAI-compatible wire protocol of ``moetier serve`` (pydantic models, no logic).

Requests are parsed from raw bytes by :func:`parse_request`, which turns every kind of bad
input (invalid UTF-8, malformed JSON, wrong types, out-of-range values, unsupported
features) into a :class:`ServeError` carrying the HTTP status and OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": "invalid_value"}}

Request models are strict (``"5"`` is not an integer, ``1`` is not a boolean) and reject
unknown fields, as OpenAI's API does. Responses and stream chunks follow OpenAI's shapes.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Upper bound on ``max_tokens`` accepted at the protocol level; the engine also checks it
# against the model's context length.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_SEQUENCES = 4


class ServeError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------- requests


def _check_max_tokens(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError(f"must be at least 1, got {v}")
    if v is not None and v > MAX_TOKENS_LIMIT:
        raise ValueError(f"must be at most {MAX_TOKENS_LIMIT}, got {v}")
    return v


# every list/dict field stops validating at its first bad item: pydantic otherwise records one error
# per item (~700 bytes each), ~190x the body for `"stop": [[], [], ...]`
_FF = Field(fail_fast=True)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextContentPart], _FF] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs a 'content' string")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM-style); 0 = off
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], _FF] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float], _FF] | None = None
    user: str | None = None
    # accepted and ignored: they do not change the output
    store: bool | None = None
    service_tier: str | None = None
    metadata: Annotated[dict[str, str], _FF] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # extension: return the generated token ids with each choice / chunk.
    return_token_ids: bool = False

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int | None:
        return _check_max_tokens(v)

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not (-(1 << 63) <= v < (1 << 64)):
            raise ValueError("must fit in 64 bits")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: (str | Annotated[list[str], _FF] | Annotated[list[int], _FF]
             | Annotated[list[Annotated[list[int], _FF]], _FF])
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)) and len(v) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(v)}")
            if isinstance(v[0], list) and len(v[0]) == 0:
                raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only best_of=1 is supported, got {v}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def prompt_value(self) -> str | list[int]:
        """The single prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if isinstance(p[0], str):
            return p[0]  # type: ignore[return-value]
        if isinstance(p[0], list):
            return list(p[0])  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Annotated[list[dict[str, Any]], _FF] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: Annotated[list[Literal["text"]], _FF] | None = None  # only text; accepted and ignored
    prediction: dict[str, Any] | None = None  # a latency hint; the output is the same without it

    @field_validator("max_completion_tokens")
    @classmethod
    def _mct(cls, v: int | None) -> int | None:
        return _check_max_tokens(v)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is not None and v != "none":
            raise ValueError("tool_choice is not supported (only 'none')")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --------------------------------------------------------------------------- parsing

_Req = TypeVar("_Req", bound=BaseModel)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str):
            # pydantic adds union member tags such as 'str', 'list[int]', 'function-after[...]'
            if part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part or "-" in part:
                continue
            out += ("." if out else "") + part
    return out or None


_UNION_HINTS = {
    "prompt": "expected a non-empty string, a list with one string, a list of token ids or a list with one "
    "list of token ids",
    "stop": "expected a string or a list of up to 4 non-empty strings",
    "content": "expected a string or a list of {'type': 'text', 'text': ...} parts (only text is supported)",
    "tool_choice": "expected 'none' (tools are not supported)",
}


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part or "-" in part
    )


def validation_error(exc: ValidationError) -> ServeError:
    """The first (most specific) pydantic error as an OpenAI invalid_request_error."""
    errors = exc.errors(include_url=False)
    # A union field yields one error per member; report the shortest location (the field).
    first = errors[0]
    param = _param_of(tuple(first["loc"]))
    if any(_is_union_tag(p) for p in first["loc"]):
        last = (param or "").rsplit(".", 1)[-1].split("[")[0]
        msg = _UNION_HINTS.get(last, "has the wrong type or an invalid value")
        for e in errors:
            if _param_of(tuple(e["loc"])) == param and e["type"] == "value_error":
                msg = e["msg"].removeprefix("Value error, ")
                break
    else:
        msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return ServeError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if first["type"] == "missing":
        return ServeError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return ServeError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# json's C parser holds the GIL for the whole document: ~0.5 s for 100k small objects, during
# which no stream moves. Bodies that may hold that many values (commas and brackets bound the
# count from above) are parsed with hooks on every object and number that let other threads
# run every 256 values (the parse stays in C otherwise, ~1.5x slower).
C_PARSE_MAX_VALUES = 20_000


def _loads(text: str, body: bytes) -> Any:
    if body.count(b",") + body.count(b"{") + body.count(b"[") <= C_PARSE_MAX_VALUES:
        return json.loads(text, parse_constant=_reject_constant)
    n = 0

    def tick() -> None:
        nonlocal n
        n += 1
        if not n & 255:
            time.sleep(0)  # releases the GIL: the event loop and the engine get their turn

    def obj(d: dict[str, Any]) -> dict[str, Any]:
        tick()
        return d

    def integer(s: str) -> int:
        tick()
        return int(s)

    def real(s: str) -> float:
        tick()
        return float(s)

    dec = json.JSONDecoder(object_hook=obj, parse_int=integer, parse_float=real, parse_constant=_reject_constant)
    return dec.decode(text)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate_path(data: Any) -> str | None:
    """The parameter path of the first string holding a lone UTF-16 surrogate (JSON allows the
    escape, but it is not a character: no tokenizer can encode it), else None. Iterative: the
    nesting depth is whatever json.loads accepted."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
            continue
        if isinstance(v, dict):  # keys too: an unknown key is echoed in the error message
            stack.extend((f"{path}.{k!r}" if path else repr(k), k) for k in v)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in reversed(list(items)):
            stack.append((f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{k}" if path else str(k)), x))
    return None


def parse_request(body: bytes, model_cls: type[_Req], max_messages: int | None = None) -> _Req:
    """Decode, parse and validate a request body; every failure is a 400 ServeError.

    ``max_messages`` refuses a longer ``messages`` list before validating its items (each
    message takes at least one token, so more than the context length cannot fit)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServeError(400, f"Request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise ServeError(400, "Request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = _loads(text, body)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ServeError(400, f"Request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ServeError(400, f"Request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate_path(data)
        if where is not None:
            raise ServeError(
                400,
                f"Invalid value for '{where}': contains a lone UTF-16 surrogate escape (\\ud800-\\udfff not "
                "part of a pair), which is not a character",
                param=where,
                code="invalid_encoding",
            )
    msgs = data.get("messages")
    if max_messages is not None and isinstance(msgs, list) and len(msgs) > max_messages:
        raise ServeError(
            400,
            f"This model's maximum context length is {max_messages} tokens, but 'messages' has {len(msgs)} "
            "messages (each takes at least one token); shorten the conversation.",
            param="messages",
            code="context_length_exceeded",
        )
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# --------------------------------------------------------------------------- responses

# extension fields (return_token_ids) are left out of the JSON unless requested
_EXTENSION: Any = Field(default=None, exclude_if=lambda v: v is None)


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "moetier"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = _EXTENSION


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = _EXTENSION


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _EXTENSION  # only in the first chunk
    content: str | None = _EXTENSION  # absent in the final chunk when nothing is left


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = _EXTENSION


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
