"""End-to-end: the official openai client against a real server on a tiny qwen3_moe model."""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from typing import Any

import httpx
import openai
import pytest

from moetier.serve.app import BackgroundServer
from tests.serve.conftest import SERVED

PROMPTS = [
    "hello world",
    "the quick brown fox",
    "Once upon a time",
    "hello moetier! hello",
    "the lazy dog jumps over",
    "a tiny model that ran on a CPU",
]


def client(srv: BackgroundServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def reference(ref_model: Any, prompt: Any, max_tokens: int, **kw: Any) -> tuple[str, list[int], str]:
    """Single-request output of the runtime itself: text, generated ids (+ EOS), finish reason."""
    ids = ref_model.encode_prompt(prompt)
    res = ref_model.generate_ids(ids, max_tokens=max_tokens, **kw)
    out = list(res.ids)
    if res.finish_reason == "eos":
        out.append(-1)  # placeholder: the server reports the EOS id it sampled
    return res.text, out, {"eos": "stop", "stop": "stop", "length": "length"}[res.finish_reason]


def same_ids(got: list[int], want: list[int], eos: tuple[int, ...]) -> bool:
    if want and want[-1] == -1:
        return len(got) == len(want) and got[:-1] == want[:-1] and got[-1] in eos
    return got == want


def metrics(srv: BackgroundServer) -> dict[str, float]:
    text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    return parse_prometheus(text)


def parse_prometheus(text: str) -> dict[str, float]:
    """Strict-enough parser of the text exposition format: every line must be valid."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) >= 3 and re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", parts[2]), line
            if parts[1] == "TYPE":
                assert parts[3] in {"counter", "gauge", "histogram", "summary", "untyped"}, line
                assert parts[2] not in typed, f"duplicate TYPE {line}"
                typed.add(parts[2])
            continue
        m = sample.match(line)
        assert m, f"bad metrics line: {line!r}"
        assert m.group(1) in typed, f"sample without TYPE: {line}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return out


# --------------------------------------------------------------------------- basic shapes


def test_models_and_health(server: BackgroundServer) -> None:
    assert [m.id for m in client(server).models.list()] == [SERVED]
    card = httpx.get(server.base_url + f"/v1/models/{SERVED}", timeout=10).json()
    assert card["id"] == SERVED and card["object"] == "model" and card["max_model_len"] == 512
    h = httpx.get(server.base_url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == SERVED


def test_completion_matches_runtime(server: BackgroundServer, ref_model: Any) -> None:
    c = client(server)
    text, ids, finish = reference(ref_model, PROMPTS[0], 20)
    r = c.completions.create(
        model=SERVED, prompt=PROMPTS[0], max_tokens=20, temperature=0, extra_body={"return_token_ids": True}
    )
    ch = r.choices[0]
    assert ch.text == text
    assert same_ids(ch.model_extra["token_ids"], ids, ref_model.tokenizer.eos_token_ids)
    assert ch.finish_reason == finish
    assert r.object == "text_completion" and r.model == SERVED
    assert r.usage.prompt_tokens == len(ref_model.encode_prompt(PROMPTS[0]))
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_token_id_prompt(server: BackgroundServer, ref_model: Any) -> None:
    ids = ref_model.encode_prompt(PROMPTS[1])
    text, _, _ = reference(ref_model, PROMPTS[1], 8)
    r = client(server).completions.create(model=SERVED, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == text


def test_chat_matches_runtime(server: BackgroundServer, ref_model: Any) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    text, ids, finish = reference(ref_model, msgs, 24)
    r = client(server).chat.completions.create(model=SERVED, messages=msgs, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(ref_model.encode_prompt(msgs))


def test_max_completion_tokens_and_default(server: BackgroundServer) -> None:
    c = client(server)
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    r = c.chat.completions.create(model=SERVED, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    r = c.completions.create(model=SERVED, prompt="hello", temperature=0)  # OpenAI's default: 16
    assert r.usage.completion_tokens <= 16


# --------------------------------------------------------------------------- streaming


def test_stream_completion_equals_nonstream(server: BackgroundServer, ref_model: Any) -> None:
    c = client(server)
    text, ids, finish = reference(ref_model, PROMPTS[2], 30)
    chunks = list(
        c.completions.create(
            model=SERVED,
            prompt=PROMPTS[2],
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    body = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].text for ch in body) == text
    got_ids = [t for ch in body for t in ch.choices[0].model_extra["token_ids"]]
    assert same_ids(got_ids, ids, ref_model.tokenizer.eos_token_ids)
    assert [ch.choices[0].finish_reason for ch in body][-1] == finish
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids)
    assert len({ch.id for ch in chunks}) == 1


def test_stream_chat(server: BackgroundServer, ref_model: Any) -> None:
    msgs = [{"role": "user", "content": "Once upon a time"}]
    text, ids, finish = reference(ref_model, msgs, 25)
    stream = client(server).chat.completions.create(
        model=SERVED, messages=msgs, max_tokens=25, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_raw_sse_framing(server: BackgroundServer) -> None:
    body = {"model": SERVED, "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


# --------------------------------------------------------------------------- sampling params


def test_stop_strings(server: BackgroundServer, ref_model: Any) -> None:
    full, _, _ = reference(ref_model, PROMPTS[3], 40)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    want, _, _ = reference(ref_model, PROMPTS[3], 40, stop=[stop])
    c = client(server)
    r = c.completions.create(model=SERVED, prompt=PROMPTS[3], max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].text == want == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model=SERVED, prompt=PROMPTS[3], max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want


def test_seeded_sampling_is_reproducible_and_matches_runtime(server: BackgroundServer, ref_model: Any) -> None:
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    text, _, _ = reference(ref_model, PROMPTS[4], 20, **kw)
    c = client(server)

    def one(_: int) -> str:
        return c.completions.create(model=SERVED, prompt=PROMPTS[4], max_tokens=20, **kw).choices[0].text

    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(one, range(4)))
    assert outs == [text] * 4
    other = (
        c.completions.create(model=SERVED, prompt=PROMPTS[4], max_tokens=20, temperature=0.9, top_p=0.95, seed=99)
        .choices[0]
        .text
    )
    assert other != text  # a different seed gives a different sample here


# --------------------------------------------------------------------------- batching


def test_concurrent_greedy_equals_single_requests(server: BackgroundServer, ref_model: Any) -> None:
    lengths = [40, 12, 33, 25, 40, 18]
    refs = [reference(ref_model, p, n) for p, n in zip(PROMPTS, lengths)]
    before = metrics(server)
    c = client(server)

    def run(i: int) -> tuple[str, list[int], str]:
        if i % 2:
            stream = c.completions.create(
                model=SERVED,
                prompt=PROMPTS[i],
                max_tokens=lengths[i],
                temperature=0,
                stream=True,
                extra_body={"return_token_ids": True},
            )
            chunks = [ch for ch in stream if ch.choices]
            return (
                "".join(ch.choices[0].text for ch in chunks),
                [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]],
                chunks[-1].choices[0].finish_reason,
            )
        r = c.completions.create(
            model=SERVED, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0, extra_body={"return_token_ids": True}
        )
        return r.choices[0].text, r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason

    for _ in range(2):
        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            outs = list(ex.map(run, range(len(PROMPTS))))
        for (text, ids, fin), (rtext, rids, rfin) in zip(outs, refs):
            assert text == rtext
            assert same_ids(ids, rids, ref_model.tokenizer.eos_token_ids)
            assert fin == rfin
    after = metrics(server)
    assert after["moetier_batch_size_max"] > 1  # requests really shared forward steps
    steps = after["moetier_engine_steps_total"] - before["moetier_engine_steps_total"]
    gen = after["moetier_generation_tokens_total"] - before["moetier_generation_tokens_total"]
    assert gen == sum(len(r[1]) for r in refs) * 2
    assert steps < gen  # fewer forwards than tokens: decode steps were batched


# --------------------------------------------------------------------------- metrics


def test_metrics_parse(server: BackgroundServer, ref_model: Any) -> None:
    client(server).completions.create(model=SERVED, prompt="hello", max_tokens=5, temperature=0)
    m = metrics(server)
    for name in [
        "moetier_request_queue_depth",
        "moetier_active_sequences",
        "moetier_batch_size",
        "moetier_generation_tokens_per_second",
        "moetier_generation_tokens_total",
        "moetier_prompt_tokens_total",
        "moetier_kv_cache_bytes",
    ]:
        assert name in m, name
    assert m["moetier_generation_tokens_total"] >= 5
    assert m['moetier_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    # weight-hierarchy figures on the model are exported, whatever their exact shape
    model = server.app.state.serving.backend.model

    class Summary:
        def summary(self) -> dict[str, Any]:
            return {
                "hit_rate": 0.75,
                "hit_rate_per_layer": {"0": 0.5, "1": 1.0},
                "cache_hit_rate": None,
                "bytes_per_token": {"resident": 1234, "cache": 10.5, "store": 0},
                "name": "x",
            }

    model.hierarchy_metrics = Summary()
    model.memory_budget = {"max_ram": 4e9, "cache_bytes": 1e9}
    try:
        m = metrics(server)
        assert m["moetier_weights_hit_rate"] == 0.75
        assert m['moetier_weights_hit_rate_per_layer{layer="1"}'] == 1.0
        assert m["moetier_weights_bytes_per_token_resident"] == 1234
        assert m["moetier_memory_budget_cache_bytes"] == 1e9
        assert not any("cache_hit_rate" in k or "name" in k for k in m)  # None / text skipped
    finally:
        del model.hierarchy_metrics, model.memory_budget
    model.metrics = {"tiers": {"ram": {"bytes": 7}}}  # a bare mapping under another name works too
    try:
        assert metrics(server)["moetier_weights_tiers_ram_bytes"] == 7
    finally:
        del model.metrics


def test_metrics_with_real_hierarchy_metrics(server: BackgroundServer) -> None:
    hm_mod = pytest.importorskip("moetier.weights.metrics")
    hm = hm_mod.HierarchyMetrics(expert_bytes=100)
    model = server.app.state.serving.backend.model
    model.hierarchy_metrics = hm
    try:
        m = metrics(server)  # parses (every line valid) whatever the figures are
        assert any(k.startswith("moetier_weights_") for k in m)
    finally:
        del model.hierarchy_metrics


# --------------------------------------------------------------------------- disconnect, queue, faults


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _health(srv: BackgroundServer) -> dict[str, Any]:
    return httpx.get(srv.base_url + "/health", timeout=10).json()


def test_stream_disconnect_frees_sequence(slow_server: Any) -> None:
    srv, backend = slow_server
    body = {"model": SERVED, "prompt": "hello", "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert _health(srv)["running"] == 1
        assert backend.kv_bytes(backend.sequences[-1]) > 0
    # client closed the connection mid-stream
    _wait(lambda: _health(srv)["running"] == 0)
    seq = backend.sequences[-1]
    assert seq.length == 0 and all(layer is None for layer in seq.layers)
    m = metrics(srv)
    assert m['moetier_requests_finished_total{reason="cancelled"}'] == 1
    assert m["moetier_kv_cache_bytes"] == 0
    assert m["moetier_generation_tokens_total"] < 400


def test_nonstream_disconnect_cancels(slow_server: Any) -> None:
    import json
    import socket

    srv, backend = slow_server
    body = json.dumps({"model": SERVED, "prompt": "hello", "max_tokens": 400, "temperature": 0}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(head + body)
        _wait(lambda: _health(srv)["running"] == 1)
        seq = backend.sequences[-1]
    # the socket is closed while the (non-streaming) generation is still running
    _wait(lambda: _health(srv)["running"] == 0)
    assert all(layer is None for layer in seq.layers)
    m = metrics(srv)
    assert m['moetier_requests_finished_total{reason="cancelled"}'] == 1
    assert m["moetier_generation_tokens_total"] < 400


def test_disconnect_while_queued_leaves_the_queue(slow_server: Any) -> None:
    srv, backend = slow_server  # max_batch=1, max_queue=1
    body = {"model": SERVED, "prompt": "hello", "max_tokens": 300, "stream": True}
    with httpx.Client(base_url=srv.base_url, timeout=30) as h, h.stream("POST", "/v1/completions", json=body) as first:
        lines = first.iter_lines()
        next(lines)
        with h.stream("POST", "/v1/completions", json=body) as second:
            assert second.status_code == 200
            _wait(lambda: _health(srv)["waiting"] == 1)
        _wait(lambda: _health(srv)["waiting"] == 0)  # left the queue without ever running
        assert _health(srv)["running"] == 1
        assert len(backend.sequences) == 1
    _wait(lambda: _health(srv)["running"] == 0)


def test_queue_full_gives_429_and_recovers(slow_server: Any) -> None:
    srv, _ = slow_server  # max_batch=1, max_queue=1
    body = {"model": SERVED, "prompt": "hello", "max_tokens": 300, "stream": True}
    with httpx.Client(base_url=srv.base_url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as first:
            first_lines = first.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(first_lines)
            _wait(lambda: _health(srv)["running"] == 1)
            with h.stream("POST", "/v1/completions", json=body) as second:
                _wait(lambda: _health(srv)["waiting"] == 1)
                with pytest.raises(openai.RateLimitError) as ei:
                    client(srv).completions.create(model=SERVED, prompt="hi", max_tokens=2)
                err = ei.value.body
                assert err["code"] == "rate_limit_exceeded" and err["message"]  # type: ignore[index]
                r = h.post(
                    "/v1/chat/completions",
                    json={"model": SERVED, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
                )
                assert r.status_code == 429 and set(r.json()["error"]) == {"message", "type", "param", "code"}
                assert int(r.headers["retry-after"]) >= 1
                assert second.status_code == 200
        _wait(lambda: _health(srv) == {**_health(srv), "running": 0, "waiting": 0})
        m = metrics(srv)
        assert m['moetier_requests_rejected_total{reason="queue_full"}'] == 2
        r = client(srv).completions.create(model=SERVED, prompt="hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1


def test_engine_fault_is_500_and_server_keeps_serving(slow_server: Any) -> None:
    srv, backend = slow_server
    backend.fail_next.set()
    with pytest.raises(openai.InternalServerError):
        client(srv).completions.create(model=SERVED, prompt="hi", max_tokens=3)
    r = client(srv).completions.create(model=SERVED, prompt="hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert all(layer is None for seq in backend.sequences for layer in seq.layers)


def test_embedded_model_chat_and_completion() -> None:
    from moetier.runtime import EMBEDDED_DIR

    if not (EMBEDDED_DIR / "config.json").is_file():
        pytest.skip("the embedded model is not installed")
    import moetier
    from moetier.serve.app import build_app

    ref = moetier.load(dtype="float32")
    msgs = [{"role": "user", "content": "Who is the king?"}]
    want_chat = ref.generate(msgs, max_tokens=24)
    want_text = ref.generate("To be, or not to be", max_tokens=24)
    app = build_app(moetier.load(dtype="float32"), model_name="moetier-embedded", max_batch=4)
    with BackgroundServer(app) as srv:
        c = client(srv)
        with cf.ThreadPoolExecutor(2) as ex:
            chat = ex.submit(
                c.chat.completions.create, model="moetier-embedded", messages=msgs, max_tokens=24, temperature=0
            )
            comp = ex.submit(
                c.completions.create,
                model="moetier-embedded",
                prompt="To be, or not to be",
                max_tokens=24,
                temperature=0,
            )
            chat_text, comp_text = chat.result().choices[0].message.content, comp.result().choices[0].text
    assert chat_text == want_chat and comp_text == want_text
    assert chat_text.strip() and comp_text.strip()


def test_serve_freezes_the_startup_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` hides start-up objects from the cyclic collector before it listens: an object alive
    before the call is no longer scanned by a full collection (no ~220 ms pause while serving)."""
    import gc

    from moetier.serve import app as app_mod

    monkeypatch.setattr(app_mod, "_uvicorn_config", lambda *a, **k: None)
    monkeypatch.setattr(app_mod.DrainingServer, "__init__", lambda self, cfg: None)
    monkeypatch.setattr(app_mod.DrainingServer, "run", lambda self: None)
    alive = {"kept": [1, 2, 3]}  # a tracked container alive at start-up
    try:
        assert any(o is alive for o in gc.get_objects())
        app_mod.serve(app_mod.FastAPI())
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())
    finally:
        gc.unfreeze()
