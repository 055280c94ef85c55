"""Thread count on a busy machine: the default settings vs every fixed ``--threads`` choice.

    python -m bench.bench_busy [--busy 1] [--rounds 3] [--prompt-len 64] [--tokens 64] [--model DIR]

With ``--busy N`` other processes each hold one core in a busy loop
(``python -c "while 1: pass"``, started here and ended by pid at the end). Every
configuration (``default`` = what ``moetier run`` does without ``--threads``, then
``threads=1..cores``) runs as its own process (``--worker``): it loads the model (default: the
embedded one), does one warm-up generation, then times ``--runs`` greedy generations
(``--prompt-len`` fixed prompt ids, ``--tokens`` new tokens, EOS ignored) and prints the
medians of prefill and decode tok/s. The configurations are run round-robin ``--rounds``
times (side by side: the same noise for each), and each configuration's figure is the median
over its rounds. The result is ``default / best fixed choice`` for decode and prefill
(target: >= 0.8 with one core held). ``--env K=V`` adds environment variables to every
worker (e.g. ``GOMP_SPINCOUNT=...`` to compare wait policies).

Results: ``bench/results/busy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import median, write_result

BUSY_LOOP = "while 1: pass"


def worker(args: argparse.Namespace) -> None:
    import moetier

    threads = None if args.threads == "default" else int(args.threads)
    model = moetier.load(args.model, threads=threads, tokenizer=False)
    prompt = [(7 * i + 3) % model.spec.vocab_size for i in range(args.prompt_len)]
    model.generate_ids(prompt, args.tokens, stop_ids=[])  # warm-up
    pre, dec = [], []
    for _ in range(args.runs):
        res = model.generate_ids(prompt, args.tokens, stop_ids=[])
        pre.append(res.prefill_tokens_per_s)
        dec.append(res.decode_tokens_per_s)
    import torch

    print(json.dumps({"prefill": median(pre), "decode": median(dec), "threads_used": torch.get_num_threads(),
                      "native_reason": model.native_reason}))


def run_worker(args: argparse.Namespace, threads: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_busy", "--worker", "--threads", threads, "--runs", str(args.runs),
           "--prompt-len", str(args.prompt_len), "--tokens", str(args.tokens)]
    if args.model:
        cmd += ["--model", args.model]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"worker {threads} failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="default", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--busy", type=int, default=1, help="cores held by busy-loop processes (default 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed generations per worker")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-threads", type=int, default=None, help="largest fixed choice (default: all cores)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra worker environment")
    p.add_argument("--out", default="busy", help="results/<out>.json")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = dict(kv.split("=", 1) for kv in args.env)
    cores = args.max_threads or len(os.sched_getaffinity(0))
    configs = ["default"] + [str(n) for n in range(1, cores + 1)]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    try:
        time.sleep(1.0)  # let the load show up in /proc/stat
        for r in range(args.rounds):
            for c in configs:
                rows[c].append(run_worker(args, c, env))
                print(f"[busy] round {r} {c:>7}: prefill {rows[c][-1]['prefill']:8.1f} "
                      f"decode {rows[c][-1]['decode']:8.1f} tok/s (threads {rows[c][-1]['threads_used']})",
                      file=sys.stderr, flush=True)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    summary: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        med = {c: median([row[phase] for row in rows[c]]) for c in configs}
        best = max(configs[1:], key=lambda c: med[c])
        summary[phase] = {"default": med["default"], "best_fixed": med[best], "best_threads": int(best),
                          "ratio": med["default"] / med[best], "per_config": med}
        print(f"[busy] {phase}: default {med['default']:.1f} tok/s, best --threads {best} {med[best]:.1f} "
              f"-> {med['default'] / med[best]:.2f}x", flush=True)
    out = write_result(args.out, {
        "command": "python -m bench.bench_busy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"busy_cores": args.busy, "cores": cores, "rounds": args.rounds, "runs": args.runs,
                     "prompt_len": args.prompt_len, "tokens": args.tokens, "env": env,
                     "model": args.model or "embedded"},
        "summary": summary,
        "rows": rows,
    })
    print(f"[busy] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
