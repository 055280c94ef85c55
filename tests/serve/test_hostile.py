"""The adversarial suite: single requests that must not stop the server, and what happens when
the engine itself fails. Each test here failed before its fix (issue 13)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import moetier
from moetier.serve.app import BackgroundServer, build_app
from moetier.serve.engine import ModelBackend
from tests.serve.conftest import SERVED

CH = "/v1/chat/completions"
CO = "/v1/completions"
JSON = {"Content-Type": "application/json"}


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _body(path: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": SERVED, "max_tokens": 3}
    if path == CH:
        base["messages"] = [{"role": "user", "content": "x"}]
    else:
        base["prompt"] = "x"
    return {**base, **kw}


def _post(url: str, path: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    """POST ``body``; a stream is read to its end (its chunks are in ``.text``)."""
    with httpx.Client(base_url=url, timeout=timeout) as c:
        if body.get("stream"):
            with c.stream("POST", path, json=body) as r:
                r.read()
                return r
        return c.post(path, json=body)


def _stream_events(r: httpx.Response) -> list[Any]:
    return [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in r.text.split("\n\n") if x]


# --------------------------------------------------------------------------- numeric extremes (item 1)

EXTREMES: list[dict[str, Any]] = [
    {"temperature": 1e-45},
    {"temperature": 1e-38},
    {"temperature": 5e-324},
    {"top_p": 1e-46},
    {"top_p": 5e-324},
    {"temperature": 5e-324, "top_p": 5e-324},
    {"temperature": 2.0, "top_p": 1.0, "top_k": 1 << 62},
    {"temperature": 1e-300, "top_k": 2, "seed": -(1 << 63)},
    {"temperature": 1.0, "seed": (1 << 64) - 1},
]


def test_numeric_extremes_of_every_sampling_field_keep_the_server_serving(server: BackgroundServer) -> None:
    url = server.base_url
    failures = []
    for path in (CO, CH):
        for stream in (False, True):
            for extra in EXTREMES:
                r = _post(url, path, _body(path, stream=stream, **extra))
                ok = r.status_code == 200
                if ok and stream:
                    ev = _stream_events(r)
                    ok = ev[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in ev)
                if not ok:
                    failures.append(f"{path} stream={stream} {extra}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # a vanishing temperature / top_p is the greedy answer
    greedy = _post(url, CO, _body(CO, max_tokens=6, temperature=0)).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-46}):
        assert _post(url, CO, _body(CO, max_tokens=6, **extra)).json()["choices"][0]["text"] == greedy
    h = httpx.get(url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"


# --------------------------------------------------------------------------- engine faults (item 1)


class PoisonBackend(ModelBackend):
    """Real model; rows of sequences whose prompt starts with POISON come back NaN (a request-local
    fault), every step sleeps a little, and ``die`` makes the next step raise a BaseException that
    no ``except Exception`` catches (the engine thread dies)."""

    POISON = [7, 7, 7]

    def __init__(self, model: Any, delay: float = 0.02):
        super().__init__(model)
        self.delay = delay
        self.poisoned: set[int] = set()
        self.die = threading.Event()

    def step(self, batch: Any) -> torch.Tensor:
        if self.die.is_set():
            self.die.clear()
            raise EngineCrash("injected crash")
        time.sleep(self.delay)
        for seq, ids in batch:
            if seq.length == 0 and list(ids[:3]) == self.POISON:
                self.poisoned.add(id(seq))
        logits = super().step(batch).clone()
        logits[:, list(self.eos_ids)] = float("-inf")
        for i, (seq, _) in enumerate(batch):
            if id(seq) in self.poisoned:
                logits[i] = float("nan")
        return logits


class EngineCrash(BaseException):
    pass


@pytest.fixture()
def poison_server(tiny_dir: Path) -> Iterator[tuple[BackgroundServer, PoisonBackend]]:
    model = moetier.load(tiny_dir)
    backend = PoisonBackend(model)
    app = build_app(model, model_name=SERVED, max_batch=4, backend=backend, max_restarts=2, restart_delay=1.0)
    with BackgroundServer(app) as srv:
        yield srv, backend


def test_a_failing_request_fails_alone(poison_server: Any) -> None:
    srv, backend = poison_server
    good = _body(CO, prompt=[1, 2, 3, 4], max_tokens=40, temperature=0.8, seed=1)
    bad = _body(CO, prompt=backend.POISON + [1], max_tokens=40, temperature=0.8, seed=1)
    with cf.ThreadPoolExecutor(3) as ex:
        fut_good = ex.submit(_post, srv.base_url, CO, good)
        time.sleep(0.1)  # the good one is decoding when the poisoned one joins the batch
        fut_bad = ex.submit(_post, srv.base_url, CO, bad)
        fut_bad_stream = ex.submit(_post, srv.base_url, CO, {**bad, "stream": True})
        rg, rb, rs = fut_good.result(), fut_bad.result(), fut_bad_stream.result()
    assert rg.status_code == 200 and rg.json()["usage"]["completion_tokens"] == 40
    assert rb.status_code == 500 and rb.json()["error"]["code"] == "internal_error"
    assert "logits" in rb.json()["error"]["message"]
    ev = _stream_events(rs)
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "internal_error"
    h = httpx.get(srv.base_url + "/health", timeout=10)
    assert h.status_code == 200 and "restarts" not in h.json()


def test_engine_thread_death_is_503_then_restarted(poison_server: Any) -> None:
    srv, backend = poison_server
    url = srv.base_url
    long = _body(CO, max_tokens=200, temperature=0)
    with cf.ThreadPoolExecutor(2) as ex:
        running = ex.submit(_post, url, CO, {**long, "stream": True})
        _wait(lambda: httpx.get(url + "/health", timeout=10).json()["running"] == 1)
        backend.die.set()
        r = running.result(timeout=30)  # answered, not left hanging
    ev = _stream_events(r)
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "engine_unavailable"
    assert "EngineCrash" in ev[-2]["error"]["message"]
    # while it is down: /health says so, and requests get 503 instead of hanging
    h = httpx.get(url + "/health", timeout=10)
    assert h.status_code == 503 and h.json()["status"] == "error" and "EngineCrash" in h.json()["reason"]
    r = _post(url, CO, _body(CO), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    # the supervisor restarts it
    _wait(lambda: httpx.get(url + "/health", timeout=10).status_code == 200)
    assert httpx.get(url + "/health", timeout=10).json()["restarts"] == 1
    r = _post(url, CO, _body(CO, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
