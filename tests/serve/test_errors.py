"""Bad input corpus: every case must get a 4xx in OpenAI's error shape naming the parameter,
and the server must keep serving afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

KEY = "sk-test-key"
MAX_BODY = 64 * 1024


@dataclass
class Case:
    name: str
    body: Any = None  # dict -> JSON; bytes -> raw
    path: str = "/v1/completions"
    status: int = 400
    param: str | None = None
    code: str | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = KEY


def C(name: str, body: Any, status: int = 400, param: str | None = None, **kw: Any) -> Case:
    return Case(name, body, status=status, param=param, **kw)


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "served", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"model": "served", "prompt": "hello", "max_tokens": 4, **kw}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


CH = "/v1/chat/completions"

CORPUS: list[Case] = [
    # ---- transport / JSON
    C("malformed json", b'{"model": "served", "prompt": ', code="invalid_json"),
    C("empty body", b"", code="invalid_json"),
    C("json array body", b"[1, 2, 3]", code="invalid_json"),
    C("json string body", b'"hello"', code="invalid_json"),
    C("invalid utf-8", b'{"model": "served", "prompt": "\xff\xfe\xfd"}', code="invalid_encoding"),
    C("NaN literal", b'{"model": "served", "prompt": "a", "temperature": NaN}', code="invalid_json"),
    C("deeply nested json", b"[" * 20_000 + b"]" * 20_000, code="invalid_json"),
    C("deeply nested object", b'{"prompt": ' + b'{"a":' * 8_000 + b"1" + b"}" * 8_001, code="invalid_json"),
    # ---- lone UTF-16 surrogates (valid JSON escapes, not characters): 4xx, never 5xx
    C("lone surrogate prompt", b'{"model": "served", "prompt": "ROMEO: \\ud800"}', param="prompt",
      code="invalid_encoding"),
    C("lone surrogate in list", b'{"model": "served", "prompt": ["ROMEO: \\udfff"]}', param="prompt[0]"),
    C("lone surrogate stop", b'{"model": "served", "prompt": "a", "stop": ["\\ud83d"]}', param="stop[0]"),
    C(
        "lone surrogate chat",
        b'{"model": "served", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
        path="/v1/chat/completions",
        param="messages[0].content",
    ),
    C("lone surrogate key", b'{"model": "served", "prompt": "a", "\\ud800": 1}', code="invalid_encoding"),
    C("oversized body", comp(prompt="x" * (MAX_BODY + 10)), status=413, code="request_too_large"),
    # ---- what a web page can send (item 4 of issue 13)
    C("text/plain body", comp(), status=415, headers={"Content-Type": "text/plain"}, code="unsupported_media_type"),
    C("form body", comp(), status=415, headers={"Content-Type": "application/x-www-form-urlencoded"}),
    C("no content type", comp(), status=415, headers={"Content-Type": ""}, code="unsupported_media_type"),
    C("foreign origin", comp(), status=403, headers={"Origin": "http://evil.example"}, code="origin_not_allowed"),
    C("null origin", None, status=403, path="/health", method="GET", headers={"Origin": "null"}),
    C("foreign origin preflight", None, status=403, method="OPTIONS", headers={"Origin": "http://evil.example"}),
    C("foreign host", comp(), status=403, headers={"Host": "attacker.example"}, code="host_not_allowed"),
    C("foreign host health", None, status=403, path="/health", method="GET", headers={"Host": "evil.example:80"}),
    # ---- auth
    C("missing api key", comp(), status=401, auth=None, code="invalid_api_key"),
    C("wrong api key", comp(), status=401, auth="sk-wrong", code="invalid_api_key"),
    C(
        "wrong auth scheme",
        comp(),
        status=401,
        auth=None,
        headers={"Authorization": f"Basic {KEY}"},
        code="invalid_api_key",
    ),
    C("missing api key on models", None, status=401, auth=None, path="/v1/models", method="GET"),
    # ---- routing
    C("unknown endpoint", comp(), status=404, path="/v1/engines", code="unknown_url"),
    C("wrong method", None, status=405, path="/v1/completions", method="GET"),
    C("unknown model id route", None, status=404, path="/v1/models/nope", method="GET", param="model"),
    # ---- completions fields
    C("missing prompt", without(comp(), "prompt"), param="prompt", code="missing_required_parameter"),
    C("prompt wrong type", comp(prompt=5), param="prompt"),
    C("prompt empty string", comp(prompt=""), param="prompt"),
    C("prompt empty list", comp(prompt=[]), param="prompt"),
    C("several prompts", comp(prompt=["a", "b"]), param="prompt"),
    C("token id out of vocab", comp(prompt=[1, 2, 10**9]), param="prompt"),
    C("negative token id", comp(prompt=[-1]), param="prompt"),
    C("prompt longer than context", comp(prompt="hello " * 5000), param="prompt", code="context_length_exceeded"),
    C("echo unsupported", comp(echo=True), param="echo"),
    C("best_of unsupported", comp(best_of=3), param="best_of"),
    C("logprobs unsupported", comp(logprobs=5), param="logprobs"),
    C("suffix unsupported", comp(suffix="end"), param="suffix"),
    # ---- shared sampling fields
    C("unknown model", comp(model="gpt-17"), status=404, param="model", code="model_not_found"),
    C("model wrong type", comp(model=7), param="model"),
    C("max_tokens zero", comp(max_tokens=0), param="max_tokens"),
    C("max_tokens negative", comp(max_tokens=-5), param="max_tokens"),
    C("max_tokens absurd", comp(max_tokens=10**12), param="max_tokens"),
    C("max_tokens string", comp(max_tokens="10"), param="max_tokens"),
    C("max_tokens float", comp(max_tokens=1.5), param="max_tokens"),
    C("max_tokens bool", comp(max_tokens=True), param="max_tokens"),
    C("max_tokens beyond context", comp(max_tokens=10**6), param="max_tokens", code="context_length_exceeded"),
    C("temperature negative", comp(temperature=-1), param="temperature"),
    C("temperature too high", comp(temperature=3.5), param="temperature"),
    C("temperature string", comp(temperature="hot"), param="temperature"),
    C("top_p zero", comp(top_p=0), param="top_p"),
    C("top_p above one", comp(top_p=1.5), param="top_p"),
    C("top_k negative", comp(top_k=-1), param="top_k"),
    C("n two", comp(n=2), param="n"),
    C("n zero", comp(n=0), param="n"),
    C("stream not bool", comp(stream="yes"), param="stream"),
    C("too many stop sequences", comp(stop=["a", "b", "c", "d", "e"]), param="stop"),
    C("empty stop sequence", comp(stop=[""]), param="stop"),
    C("stop wrong type", comp(stop=123), param="stop"),
    C("seed string", comp(seed="42"), param="seed"),
    C("seed too large", comp(seed=2**70), param="seed"),
    C("unknown parameter", comp(foo=1), param="foo", code="unknown_parameter"),
    C("presence_penalty unsupported", comp(presence_penalty=1.0), param="presence_penalty"),
    C("frequency_penalty out of range", comp(frequency_penalty=5.0), param="frequency_penalty"),
    C("logit_bias unsupported", comp(logit_bias={"5": 10}), param="logit_bias"),
    C("stream_options wrong type", comp(stream=True, stream_options="usage"), param="stream_options"),
    C("stream_options unknown key", comp(stream=True, stream_options={"x": 1}), param="stream_options.x"),
    # ---- chat fields
    C("missing messages", without(chat(), "messages"), path=CH, param="messages", code="missing_required_parameter"),
    C("empty messages", chat(messages=[]), path=CH, param="messages"),
    C("messages not a list", chat(messages="hi"), path=CH, param="messages"),
    C("message not an object", chat(messages=["hi"]), path=CH, param="messages[0]"),
    C("message missing role", chat(messages=[{"content": "hi"}]), path=CH, param="messages[0].role"),
    C("unknown role", chat(messages=[{"role": "wizard", "content": "hi"}]), path=CH, param="messages[0].role"),
    C("tool role unsupported", chat(messages=[{"role": "tool", "content": "x"}]), path=CH, param="messages[0].role"),
    C("content wrong type", chat(messages=[{"role": "user", "content": 5}]), path=CH, param="messages[0].content"),
    C("user content missing", chat(messages=[{"role": "user"}]), path=CH, param="messages[0]"),
    C(
        "image content part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
        path=CH,
        param="messages[0].content",
    ),
    C(
        "second message bad role",
        chat(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
        path=CH,
        param="messages[1].role",
    ),
    C("chat unknown model", chat(model="nope"), path=CH, status=404, param="model", code="model_not_found"),
    C(
        "chat messages beyond context",
        chat(messages=[{"role": "user", "content": "hello " * 5000}]),
        path=CH,
        param="messages",
        code="context_length_exceeded",
    ),
    C("max_completion_tokens zero", chat(max_completion_tokens=0), path=CH, param="max_completion_tokens"),
    C("chat n three", chat(n=3), path=CH, param="n"),
    C("chat temperature nan string", chat(temperature="NaN"), path=CH, param="temperature"),
    C("chat logprobs unsupported", chat(logprobs=True), path=CH, param="logprobs"),
    C("chat tools unsupported", chat(tools=[{"type": "function", "function": {"name": "f"}}]), path=CH, param="tools"),
    C("chat response_format json", chat(response_format={"type": "json_object"}), path=CH, param="response_format"),
    C("chat unknown parameter", chat(functions=[]), path=CH, param="functions"),
    C("chat stream wrong type", chat(stream=1), path=CH, param="stream"),
]


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.auth:
        headers["Authorization"] = f"Bearer {case.auth}"
    if isinstance(case.body, bytes):
        content = case.body
    elif case.body is None:
        content = None
    else:
        content = json.dumps(case.body).encode()
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return client.request(case.method, case.path, content=content, headers=headers)


def test_corpus_is_large_and_names_unique() -> None:
    assert len(CORPUS) >= 40
    assert len({c.name for c in CORPUS}) == len(CORPUS)


def test_bad_input_corpus(keyed_server: str) -> None:
    failures = []
    with httpx.Client(base_url=keyed_server, timeout=30) as client:
        for case in CORPUS:
            r = _send(client, case)
            try:
                body = r.json()
            except ValueError:
                failures.append(f"{case.name}: non-JSON answer {r.status_code} {r.text[:100]!r}")
                continue
            err = body.get("error") if isinstance(body, dict) else None
            problems = []
            if r.status_code != case.status:
                problems.append(f"status {r.status_code} != {case.status}")
            if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
                problems.append(f"not OpenAI's error shape: {body}")
            else:
                if not isinstance(err["message"], str) or not err["message"]:
                    problems.append("empty message")
                if case.param is not None and err["param"] != case.param:
                    problems.append(f"param {err['param']!r} != {case.param!r}")
                if case.param is not None and case.param.split(".")[0].split("[")[0] not in err["message"]:
                    problems.append(f"message does not name {case.param}: {err['message']!r}")
                if case.code is not None and err["code"] != case.code:
                    problems.append(f"code {err['code']!r} != {case.code!r}")
            if problems:
                failures.append(f"{case.name}: " + "; ".join(problems) + f" -- {r.text[:300]}")
        # after the corpus, the server still serves normal requests
        ok = client.post("/v1/completions", json=comp(max_tokens=3), headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
        ok = client.post(CH, json=chat(max_tokens=3), headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        assert client.get("/health").json()["status"] == "ok"  # no key needed
    assert not failures, "\n".join(failures)


def test_error_via_openai_client(keyed_server: str) -> None:
    import openai

    c = openai.OpenAI(base_url=keyed_server + "/v1", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="served", prompt="hi", max_tokens=4, temperature=9)
    assert ei.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    bad = openai.OpenAI(base_url=keyed_server + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in c.models.list()] == ["served"]


def test_oversized_chunked_body_without_content_length(keyed_server: str) -> None:
    def body():  # no Content-Length: the limit must hold while streaming the body in
        yield b'{"model": "served", "prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(keyed_server + "/v1/completions", content=body(), headers=headers, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(keyed_server + "/v1/completions", json=comp(max_tokens=2), headers=headers, timeout=30)
    assert ok.status_code == 200
