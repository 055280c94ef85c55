"""``moetier serve --ep 2`` on loopback: answers like one process; a HUNG follower (SIGSTOP) ->
/health and requests answer 503 with the reason; the job is then restarted by the launcher and
serves the same answer again."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import moetier
from moetier.distributed.launch import free_port

PROMPT = "Once upon a time"


def get(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except http.client.HTTPException:  # the launcher stopped the server mid-answer (restart)
            return 0, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
        return 0, {}


def wait_for(url: str, status: int, deadline_s: float) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        code, body = get(url)
        if code == status:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status} within {deadline_s} s")


def ranks_of(spawner: int) -> dict[int, int]:
    """RANK -> pid of the launcher's children."""
    out = {}
    for pid in Path(f"/proc/{spawner}/task/{spawner}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        out[rank] = int(pid)
    return out



def stop(p: subprocess.Popen, log) -> None:
    """SIGTERM the server (killed if it has not exited within 30 s), then close its log."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    log.close()

@pytest.mark.slow
def test_serve_ep_503_on_a_hung_rank_then_restart_resumes(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MOETIER_EP_TIMEOUT": "4", "MOETIER_EP_FAULT_GRACE": "8"}
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "moetier", "serve", "--ep", "2", "--port", str(port),
                          "--log-level", "warning", "--ep-restarts", "1"], env=env, stdout=log, stderr=log)
    try:
        wait_for(f"{base}/health", 200, 300)
        req = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
        code, first = get(f"{base}/v1/completions", req)
        assert code == 200
        ref = moetier.load(dtype="float32", native=False, threads=1).generate(PROMPT, max_tokens=5)
        assert first["choices"][0]["text"] == ref  # rank 0 + rank 1's experts = one process
        with urllib.request.urlopen(f"{base}/metrics", timeout=60) as r:
            prom = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                        if line.startswith("moetier_weights_expert_parallel_"))
        pre = "moetier_weights_expert_parallel_"
        assert float(prom[pre + "remote_pairs"]) > 0 and float(prom[pre + "planner_pair_bytes"]) == 256 * 4
        assert float(prom[pre + "replicated_exchange"]) == 0  # the default: direct
        shm = os.environ.get("MOETIER_EP_TRANSPORT", "auto") != "gloo"  # auto: both ranks on this machine
        assert float(prom[pre + "shm_transport"]) == shm
        assert float(prom[pre + "dispatch_bytes_sent"]) == float(prom[pre + "remote_pairs"]) * 256 * 4
        ranks = ranks_of(p.pid)
        os.kill(ranks[1], signal.SIGSTOP)  # hung follower: alive, silent
        down = wait_for(f"{base}/health", 503, 60)  # the heartbeat times out -> 503 with the reason
        assert "expert-parallel rank lost" in down["reason"] and "timed out" in down["reason"]
        code, body = get(f"{base}/v1/completions", req)
        assert code == 503 and "expert-parallel rank lost" in body["error"]["message"]
        wait_for(f"{base}/health", 200, 300)  # the launcher restarted the whole job
        code, again = get(f"{base}/v1/completions", req)
        assert code == 200 and again["choices"][0]["text"] == ref
        assert ranks_of(p.pid)[1] != ranks[1]
    finally:
        stop(p, log)
    text = (tmp_path / "serve.log").read_text()
    assert "restarting it (1 of 1)" in text


@pytest.mark.slow
def test_serve_ep_replicated_answers_like_one_process(tmp_path):
    """``serve --ep 2 --ep-exchange replicated``: the follower mirrors every engine step (new, batched
    and freed sequences) on its own copies; concurrent requests answer like one process, and
    /metrics reports the replicated pattern's bytes."""
    import concurrent.futures

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "moetier", "serve", "--ep", "2", "--port", str(port),
                          "--log-level", "warning", "--ep-exchange", "replicated", "--ep-restarts", "0"],
                         env=dict(os.environ), stdout=log, stderr=log)
    prompts = [PROMPT, "The little dog", "Once upon a time"]  # the same prompt twice: a sequence per request
    try:
        wait_for(f"{base}/health", 200, 300)
        ref = moetier.load(dtype="float32", native=False, threads=1)
        for _ in range(2):  # the second round reuses nothing: its sequences are new, the first round's freed
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                got = list(pool.map(lambda q: get(f"{base}/v1/completions",
                                                  {"prompt": q, "max_tokens": 6, "temperature": 0}), prompts))
            assert [c for c, _ in got] == [200] * 3
            assert [b["choices"][0]["text"] for _, b in got] == [ref.generate(q, max_tokens=6) for q in prompts]
        with urllib.request.urlopen(f"{base}/metrics", timeout=60) as r:
            prom = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                        if line.startswith("moetier_weights_expert_parallel_"))
        pre = "moetier_weights_expert_parallel_"
        assert float(prom[pre + "replicated_exchange"]) == 1
        assert float(prom[pre + "shm_transport"]) == 0  # replicated: gloo
        assert float(prom[pre + "dispatch_bytes_sent"]) == 0  # no dispatch: rank 1 ran the same forward
        assert float(prom[pre + "combine_bytes_sent"]) == float(prom[pre + "local_pairs"]) * 256 * 4 > 0
        assert float(prom[pre + "combine_bytes_recv"]) == float(prom[pre + "remote_pairs"]) * 256 * 4 > 0
    finally:
        stop(p, log)


def test_serve_ep_batches_natively_like_one_process_and_stops_cleanly(tmp_path):
    """``serve --ep 2`` (direct, native): concurrent requests run as batched native steps under
    expert parallelism (rows exchanged per MoE layer) and answer exactly like one native process
    serving them one at a time; SIGTERM stops the job cleanly: rank 0 releases the follower before
    it leaves (uvicorn re-raises the signal it stopped on), so no rank reports a lost peer."""
    import concurrent.futures

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "moetier", "serve", "--ep", "2", "--port", str(port), "--dtype",
                          "float32", "--log-level", "warning", "--ep-restarts", "0"],
                         env=dict(os.environ), stdout=log, stderr=log)
    prompts = [PROMPT, "The little dog", "Once upon a time", "A cat sat"]
    try:
        wait_for(f"{base}/health", 200, 300)
        ref = moetier.load(dtype="float32", threads=1)
        want = [ref.generate(q, max_tokens=32) for q in prompts]  # long enough for the requests to overlap
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda q: get(f"{base}/v1/completions",
                                              {"prompt": q, "max_tokens": 32, "temperature": 0}), prompts))
        assert [c for c, _ in got] == [200] * len(prompts)
        assert [b["choices"][0]["text"] for _, b in got] == want
        with urllib.request.urlopen(f"{base}/metrics", timeout=60) as r:
            prom = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                        if line.startswith("moetier_weights_expert_parallel_") or line.startswith("moetier_engine_"))
        assert float(prom["moetier_weights_expert_parallel_remote_pairs"]) > 0
        # requests were batched: more sequences than steps
        assert float(prom["moetier_engine_step_sequences_total"]) > float(prom["moetier_engine_steps_total"])
    finally:
        stop(p, log)
    assert p.returncode in (0, 130), p.returncode
    text = (tmp_path / "serve.log").read_text()
    assert "error" not in text.lower(), text
