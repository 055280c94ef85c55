"""Benchmark `moetier serve`: N concurrent streaming clients for a fixed time (not run in CI).

Starts `moetier serve` as a subprocess on a free loopback port, computes each prompt's
single-request greedy output first (one request at a time), then for each N in --clients
runs N client threads that stream greedy completions in a loop for --duration seconds and
checks every streamed answer against the single-request reference, token for token
(no lost, duplicated or reordered tokens; no cross-talk between batched requests). It
samples the server's RSS once per second and reads /metrics for the mean batch size.

    python bench/bench_serve.py                          # embedded model, N = 1, 4, 16
    python bench/bench_serve.py --model DIR --duration 20 --out bench/results/serve.json
    python bench/bench_serve.py --ep 2 --clients 1,16 --dtypes float32   # expert parallelism, 2 local ranks

Aggregate tokens/s at N is completion tokens of the requests finished in the window divided
by the window; N = 1 is "serving the same requests one by one", so the batching gain at N is
tokens/s(N) / tokens/s(1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import wait_healthy  # noqa: E402
from moetier.serve.app import free_port  # noqa: E402

PROMPTS = [
    "To be, or not to be",
    "In the beginning",
    "Once upon a time",
    "The king said",
    "What is the meaning of",
    "My lord, I",
    "And God said, Let there be",
    "Now is the winter of",
]


def metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def stream_one(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[str, list[int], str]:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    text, ids, finish, usage = [], [], None, None
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"]["message"])
            usage = obj.get("usage") or usage
            for ch in obj["choices"]:
                text.append(ch["text"])
                ids.extend(ch.get("token_ids") or [])
                finish = ch["finish_reason"] or finish
    if usage is None or usage["completion_tokens"] != len(ids):
        raise IntegrityError(f"usage {usage} does not count the {len(ids)} streamed token ids")
    return "".join(text), ids, finish or "?"


class IntegrityError(Exception):
    """Streamed tokens lost, duplicated or inconsistent with the text / usage."""


def reference(base: str, prompt: str, max_tokens: int) -> tuple[str, list[int], str]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    ch = r.json()["choices"][0]
    return ch["text"], ch["token_ids"], ch["finish_reason"]


def run_phase(
    base: str, n: int, duration: float, max_tokens: int, refs: dict[str, Any], pid: int, decode: Any
) -> dict[str, Any]:
    proc = psutil.Process(pid)
    m0 = metrics(base)
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    stats = {"requests": 0, "tokens": 0, "errors": 0, "integrity": 0, "mismatches": 0, "first_error": None}
    rss: list[int] = []

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as c:
            i = k
            while time.monotonic() < stop_at:
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    got = stream_one(c, prompt, max_tokens)
                    # (the runtime's TextStream drops a trailing incomplete UTF-8 character at the end)
                    if got[0] != decode(got[1]).rstrip("\ufffd"):
                        raise IntegrityError("streamed text != decode(streamed token ids)")
                except IntegrityError as e:
                    with lock:
                        stats["integrity"] += 1
                        stats["first_error"] = stats["first_error"] or repr(e)
                    continue
                except Exception as e:
                    with lock:
                        stats["errors"] += 1
                        stats["first_error"] = stats["first_error"] or repr(e)
                    continue
                with lock:
                    stats["requests"] += 1
                    stats["tokens"] += len(got[1])
                    if got != refs[prompt]:
                        stats["mismatches"] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(proc.memory_info().rss)
        time.sleep(1.0)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    m1 = metrics(base)
    steps = m1["moetier_engine_steps_total"] - m0["moetier_engine_steps_total"]
    seqs = m1["moetier_engine_step_sequences_total"] - m0["moetier_engine_step_sequences_total"]
    return {
        "clients": n,
        "elapsed_s": round(elapsed, 2),
        "requests": stats["requests"],
        "completion_tokens": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / elapsed, 2),
        "errors": stats["errors"],
        "first_error": stats["first_error"],
        # tokens lost / duplicated: streamed text != decode(streamed ids), or usage != len(ids)
        "integrity_failures": stats["integrity"],
        # greedy answer differs from the same prompt served alone (batch-dependent numerics)
        "mismatches_vs_single_request": stats["mismatches"],
        "mean_batch_size": round(seqs / steps, 2) if steps else 0.0,
        "engine_steps": int(steps),
        "rss_start_bytes": rss[0] if rss else None,
        "rss_end_bytes": rss[-1] if rss else None,
        "rss_max_bytes": max(rss) if rss else None,
        # growth over the second half of the window (after the batch has filled up): ~0 = flat
        "rss_second_half_drift_bytes": (rss[-1] - rss[len(rss) // 2]) if len(rss) > 2 else None,
    }


def bench_one_server(args: argparse.Namespace, dtype: str, counts: list[int]) -> dict[str, Any]:
    """Start `moetier serve` with ``dtype``, check references, run every N; one result block."""
    port = free_port()
    cmd = [sys.executable, "-m", "moetier.cli", "serve"] + ([args.model] if args.model else [])
    cmd += ["--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", "256"]
    cmd += ["--log-level", "warning", "--dtype", dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ep:
        cmd += ["--ep", str(args.ep)]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, base)
        model_id = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        from moetier.runtime import EMBEDDED_DIR
        from moetier.tokenizer import Tokenizer

        tok = Tokenizer(args.model or EMBEDDED_DIR)
        refs = {p: reference(base, p, args.max_tokens) for p in PROMPTS}  # one request at a time
        for p in PROMPTS:  # streaming alone must reproduce the non-streaming answer
            with httpx.Client(base_url=base, timeout=300) as c:
                assert stream_one(c, p, args.max_tokens) == tuple(refs[p]), f"stream != non-stream for {p!r}"
        refs = {p: tuple(v) for p, v in refs.items()}
        runs = []
        for n in counts:
            r = run_phase(base, n, args.duration, args.max_tokens, refs, server.pid, tok.decode)
            r["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps({"dtype": dtype, **r}), flush=True)
            runs.append(r)
        base_tps = next((r["tokens_per_s"] for r in runs if r["clients"] == 1), None)
        rss = [r["rss_end_bytes"] for r in runs if r["rss_end_bytes"]]
        return {
            "model": model_id,
            "dtype": dtype,
            "runs": runs,
            "batching_gain_vs_one_by_one": {
                str(r["clients"]): round(r["tokens_per_s"] / base_tps, 2) for r in runs if base_tps
            },
            "errors": sum(r["errors"] for r in runs),
            "integrity_failures": sum(r["integrity_failures"] for r in runs),
            "mismatches_vs_single_request": sum(r["mismatches_vs_single_request"] for r in runs),
            "rss_growth_first_to_last_phase_bytes": (rss[-1] - rss[0]) if len(rss) > 1 else 0,
        }
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per client count")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtypes", default="auto,float32", help="server --dtype values to run, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    ap.add_argument("--ep", type=int, default=0, metavar="P",
                    help="serve with expert parallelism over P local ranks (`moetier serve --ep P`)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    blocks = [bench_one_server(args, d, counts) for d in args.dtypes.split(",")]
    result = {
        "benchmark": "moetier serve: N concurrent streaming clients, greedy, fixed time per N",
        "command": "python bench/bench_serve.py " + " ".join(sys.argv[1:]),
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "duration_s_per_n": args.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "shared machine: other jobs were running; see loadavg_1m_after per run",
        },
        "results": blocks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for b in blocks:
        print(json.dumps({k: v for k, v in b.items() if k != "runs"}))
    ok = all(b["errors"] == 0 and b["integrity_failures"] == 0 for b in blocks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
