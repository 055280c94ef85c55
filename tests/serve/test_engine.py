"""Engine behaviour below HTTP: mixed prefill/decode steps, chunked prefill, queue cancellation,
the access log line and the `moetier serve` command."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

import moetier
from moetier.cli import main
from moetier.serve.app import BackgroundServer, build_app, free_port
from moetier.serve.engine import Delta, Engine, Finished, ModelBackend, RequestParams
from tests.serve.conftest import SERVED, SlowBackend


class RecordingBackend(ModelBackend):
    """Records each step's tokens per sequence. With ``pause_at=k`` the k-th step (0-based)
    waits until ``resume`` is set, after setting ``paused``: a test can submit requests while
    earlier ones are known to be mid-generation (ordering, not timing)."""

    def __init__(self, model: Any, pause_at: int | None = None):
        super().__init__(model)
        self.steps: list[list[int]] = []
        self.pause_at = pause_at
        self.paused = threading.Event()
        self.resume = threading.Event()

    def step(self, batch: Any) -> Any:
        if len(self.steps) == self.pause_at:
            self.paused.set()
            assert self.resume.wait(60), "the test never resumed the engine"
        self.steps.append([len(ids) for _, ids in batch])
        return super().step(batch)


def _run_engine(engine: Engine, jobs: list[tuple[list[int], RequestParams]],
                between: Any = None, after: Any = None) -> list[Any]:
    """Run ``jobs`` through ``engine``. With ``between`` (a blocking callable, run off the event
    loop), the first job is submitted alone, then ``between()`` runs, then the other jobs are
    submitted, then ``after()``: the test controls the order of events, not their timing."""
    async def go() -> list[Any]:
        async def collect(h: Any) -> tuple[list[int], Finished]:
            out: list[int] = []
            async for ev in h.events():
                assert isinstance(ev, (Delta, Finished)), ev
                out.extend(ev.token_ids)
                if isinstance(ev, Finished):
                    return out, ev
            raise AssertionError("no Finished event")

        handles = [engine.submit(*jobs[0])]
        if between is not None:
            await asyncio.get_running_loop().run_in_executor(None, between)
        handles += [engine.submit(ids, p) for ids, p in jobs[1:]]
        if after is not None:
            after()
        return await asyncio.gather(*(collect(h) for h in handles))

    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        engine.stop()


def test_prefill_joins_running_decodes_in_one_step(tiny_dir: Path, ref_model: Any) -> None:
    # the engine holds its 3rd step (the first request's 2nd decode) until the later requests
    # are queued: they are admitted while it is mid-generation, whatever the machine's load
    backend = RecordingBackend(moetier.load(tiny_dir), pause_at=2)
    engine = Engine(backend, max_batch=4)
    prompts = ["hello world", "the quick brown fox jumps", "Once upon a time there was"]
    jobs = [(ref_model.encode_prompt(p), RequestParams(max_tokens=30)) for p in prompts]

    def first_is_decoding() -> None:
        assert backend.paused.wait(60), "the first request did not reach its 3rd step"

    results = _run_engine(engine, jobs, between=first_is_decoding, after=backend.resume.set)
    n0, n1, n2 = (len(ids) for ids, _ in jobs)
    assert backend.steps[:3] == [[n0], [1], [1]], backend.steps[:3]  # prefill, then decodes alone
    # the later requests' prefills (n > 1) ran in the same flat forward as the first one's decode
    assert backend.steps[3] == [1, n1, n2], backend.steps[:5]
    for (ids, fin), (prompt_ids, _) in zip(results, jobs):
        ref = ref_model.generate_ids(prompt_ids, max_tokens=30)
        assert ids[: len(ref.ids)] == ref.ids
        assert fin.completion_tokens == len(ids)


def test_chunked_prefill_matches_whole_prefill(tiny_dir: Path, ref_model: Any) -> None:
    backend = RecordingBackend(moetier.load(tiny_dir))
    engine = Engine(backend, max_batch=4, max_step_tokens=5)
    prompt = ref_model.encode_prompt("the quick brown fox jumps over the lazy dog. Once upon a time")
    assert len(prompt) > 12
    [(ids, fin)] = _run_engine(engine, [(prompt, RequestParams(max_tokens=10))])
    assert max(sum(s) for s in backend.steps) <= 5  # never more than the token budget per step
    ref = ref_model.generate_ids(prompt, max_tokens=10)
    assert ids[: len(ref.ids)] == ref.ids


def test_cancel_while_waiting(tiny_dir: Path) -> None:
    backend = SlowBackend(moetier.load(tiny_dir), delay=0.02)
    engine = Engine(backend, max_batch=1, max_queue=4)

    async def go() -> None:
        a = engine.submit([5, 6, 7], RequestParams(max_tokens=50))
        b = engine.submit([5, 6, 7], RequestParams(max_tokens=50))
        assert engine.queue_depth >= 1
        engine.cancel(b)
        assert b.done and b.finish_reason == "cancelled"
        n = 0
        async for ev in a.events():
            n += len(ev.token_ids) if isinstance(ev, (Delta, Finished)) else 0
        assert n == 50
        assert engine.queue_depth == 0
        assert len(backend.sequences) == 1  # b never got a sequence

    engine.start()
    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()
    assert engine.metrics.finish_reasons["cancelled"] == 1


def test_one_access_log_line_per_request(tiny_dir: Path, caplog: Any) -> None:
    app = build_app(moetier.load(tiny_dir), model_name=SERVED)
    with caplog.at_level(logging.INFO, logger="moetier.serve"), BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
        c.completions.create(model=SERVED, prompt="hello", max_tokens=3, temperature=0)
        httpx.post(srv.base_url + "/v1/completions", content=b"{bad", headers={"Content-Type": "application/json"})
        time.sleep(0.2)
    lines = [
        r.getMessage() for r in caplog.records if r.name == "moetier.serve" and "/v1/completions" in r.getMessage()
    ]
    assert len(lines) == 2, lines
    assert '"POST /v1/completions" 200' in lines[0] and "completion_tokens=3" in lines[0]
    assert '"POST /v1/completions" 400' in lines[1]


def test_cli_help_and_bad_args(capsys: Any) -> None:
    try:
        main(["serve", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "--max-queue" in capsys.readouterr().out
    assert main(["serve", "/no/such/dir"]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--max-ram", "lots"]) == 2


def test_cli_serves(tiny_dir: Path) -> None:
    """The CLI serves with the key from $MOETIER_API_KEY (kept out of ps), protects /metrics with
    it, and on SIGTERM drains a running stream: it ends with [DONE], not a cut connection."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MOETIER_API_KEY": "k"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moetier.cli",
            "serve",
            str(tiny_dir),
            "--port",
            str(port),
            "--shutdown-timeout",
            "3",
            "--max-batch",
            "4",
            "--served-model-name",
            SERVED,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30)
        with cf.ThreadPoolExecutor(3) as ex:
            outs = list(
                ex.map(
                    lambda p: c.completions.create(model=SERVED, prompt=p, max_tokens=5, temperature=0),
                    ["hello", "the quick", "Once"],
                )
            )
        assert all(o.usage.completion_tokens >= 1 for o in outs)
        assert "k" not in proc.args
        assert httpx.get(base + "/metrics", timeout=10).status_code == 401
        assert httpx.get(base + "/metrics", headers={"Authorization": "Bearer k"}, timeout=10).status_code == 200
        body = {"model": SERVED, "prompt": "hello", "max_tokens": 400, "stream": True}
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    proc.terminate()  # SIGTERM mid-stream
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        assert "error" in last or last["choices"][0]["finish_reason"] in ("stop", "length"), last
        assert proc.wait(timeout=20) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/v1" in out
    assert out.count('"POST /v1/completions" 200') == 4
    assert "Task was destroyed" not in out and "Traceback" not in out, out


def test_max_ram_serves_through_the_weight_hierarchy(tiny_dir: Path) -> None:
    import pytest

    pytest.importorskip("moetier.weights.tiered")
    from moetier.cli import build_parser
    from moetier.commands.serve import _load_model

    args = build_parser().parse_args(["serve", str(tiny_dir), "--max-ram", "2G", "--max-batch", "4"])
    model = _load_model(args)
    assert getattr(model, "hierarchy_metrics", None) is not None
    ref = moetier.load(tiny_dir)
    with BackgroundServer(build_app(model, model_name=SERVED, max_batch=4)) as srv:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompts = ["hello world", "the quick brown fox", "Once upon a time"]
        with cf.ThreadPoolExecutor(3) as ex:
            outs = list(
                ex.map(lambda p: c.completions.create(model=SERVED, prompt=p, max_tokens=12, temperature=0), prompts)
            )
        for p, o in zip(prompts, outs):  # tiered experts give the same greedy text as all-in-RAM
            assert o.choices[0].text == ref.generate(p, max_tokens=12)
        text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    assert "moetier_weights_hit_rate" in text and "moetier_weights_bytes_per_token_store" in text


class _Crash(BaseException):
    """Escapes every `except Exception`: the engine thread dies."""


def test_engine_death_answers_running_and_waiting_requests(tiny_dir: Path) -> None:
    """Issue 13 item 1: if the engine thread dies, the request it was running AND the one waiting
    for a batch slot are answered 503 (not left hanging), it says why, and new ones are refused."""
    from moetier.serve.engine import EngineUnavailable, Failed

    class Dying(ModelBackend):
        def __init__(self, model: Any) -> None:
            super().__init__(model)
            self.in_step = threading.Event()
            self.die = threading.Event()

        def step(self, batch: Any) -> Any:
            self.in_step.set()
            assert self.die.wait(60)
            raise _Crash("injected")

    backend = Dying(moetier.load(tiny_dir))
    engine = Engine(backend, max_batch=1, max_restarts=0)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        running = engine.submit([5, 6, 7], RequestParams(max_tokens=5))
        assert await loop.run_in_executor(None, backend.in_step.wait, 60)
        waiting = engine.submit([5, 6, 7], RequestParams(max_tokens=5))
        assert engine.queue_depth == 1 and engine.active == 1
        backend.die.set()
        for h in (running, waiting):
            evs = [ev async for ev in h.events()]
            assert len(evs) == 1 and isinstance(evs[0], Failed) and evs[0].status == 503, evs
            assert "_Crash" in evs[0].message
        assert not engine.alive and "_Crash" in (engine.dead_reason or "")
        try:
            engine.submit([5], RequestParams(max_tokens=1))
            raise AssertionError("a dead engine accepted a request")
        except EngineUnavailable as e:
            assert "_Crash" in str(e)

    engine.start()
    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        engine.stop()


def test_server_context_is_the_models_context_limit(tiny_dir: Path) -> None:
    """With --context (the KV a --max-ram budget reserves), the server refuses by that length,
    not by the model's window (issue 13 item 2: memory stays inside what was reserved)."""
    model = moetier.load(tiny_dir, context=64)
    with BackgroundServer(build_app(model, model_name=SERVED)) as srv:
        body = {"model": SERVED, "prompt": list(range(3, 70)), "max_tokens": 1}
        r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "64 tokens" in r.json()["error"]["message"]
        body = {"model": SERVED, "prompt": [3, 4, 5], "max_tokens": 62}
        r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        body["max_tokens"] = 61
        r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 64
        assert httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"] == 64
