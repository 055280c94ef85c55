"""Per-rank timeline of expert-parallel decode steps (issue 17): where a P = 2 step spends the
time it takes beyond a single process's.

    python -m bench.ep_timeline OUTDIR [--ranks 2] [--tokens 100] [--exchange direct]
    python -m bench.ep_timeline OUTDIR --summary      # again, from OUTDIR's event files

Every rank wraps ``EPGroup``'s message calls (``_p2p``: posting a send / receive, ``_wait``),
its decode paths (``dispatch``, ``_dispatch_one``, ``_recv_ctrl``, ``_compute_one``,
``_exchange``, ``_post_slots``, ``_spin``, ``_post_answer``, ``_send_answer``) and every
expert FFN (``expert_forward``) with ``time.perf_counter`` (CLOCK_MONOTONIC: one clock for
every process on the machine), decodes ``--tokens`` greedy steps of the embedded model
(float32, 1 thread per rank; ``--ranks 1``: one process, torch path) and writes its events to
``OUTDIR/ev<rank>.json``. The summary prints, per decode step (medians over the steps after 3
warm-up steps), each rank's time in each wrapped call, then for ``direct`` the median
latencies around one MoE layer and six layers' timelines in microseconds from the start of
rank 0's dispatch. The wrappers add a few us per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS: list[tuple[str, float, float, dict]] = []
GROUP_CALLS = ("dispatch", "_dispatch_one", "_recv_ctrl", "_compute_one", "_exchange", "_post_slots", "_spin",
               "_post_answer", "_send_answer")  # those the code has


def _wrap(obj, attr: str, name: str, info=None) -> None:
    f = getattr(obj, attr)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            EVENTS.append((name, t0, time.perf_counter(), info(*a, **k) if info else {}))
    setattr(obj, attr, timed)


def worker(outdir: str, tokens: int, exchange: str) -> None:
    import torch

    import moetier
    import moetier.distributed as ep
    from moetier.distributed import executor
    from moetier.layers import moe

    _wrap(moe, "expert_forward", "expert")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, world = ep.init(timeout_s=120.0)
        model, group = ep.load(None, rank, world, None, dtype="float32", tokenizer=False, threads=1,
                               exchange=exchange)
        G = executor.EPGroup
        _wrap(G, "_wait", "wait")
        _wrap(G, "_p2p", "post", lambda self, t, peer, tag, send, wait=True: {"send": send, "tag": tag})
        for m in GROUP_CALLS:
            if hasattr(G, m):
                _wrap(G, m, m)
        if rank != 0:
            try:
                group.serve(model)
            finally:
                Path(outdir, f"ev{rank}.json").write_text(json.dumps(EVENTS))
            ep.shutdown()
            return
    else:
        model = moetier.load(None, dtype="float32", tokenizer=False, native=False, threads=1)
        _wrap(moe, "dispatch", "dispatch")
    seq = model.new_sequence(capacity=16 + tokens)
    logits = model.step([(seq, [5, 17, 42, 7])])
    for i in range(tokens):
        if i == 3:
            EVENTS.clear()
        t = logits.argmax(dim=-1).tolist()
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model.step([(seq, t)])
        EVENTS.append(("step", t0, time.perf_counter(), {}))
    Path(outdir, "ev0.json").write_text(json.dumps(EVENTS))
    if world > 1:
        group.stop()
        ep.shutdown()


def summary(outdir: str) -> None:
    evs = {int(f.name[2:-5]): json.loads(f.read_text()) for f in sorted(Path(outdir).glob("ev*.json"))}
    e0 = evs[0]
    steps = [e for e in e0 if e[0] == "step"]
    names = ("expert", "post", "wait", *GROUP_CALLS)
    per: dict[str, list[float]] = {"step": [b - a for _, a, b, _ in steps]}
    for _, a, b, _ in steps:
        for rk, ev in evs.items():
            inside = [e for e in ev if a <= e[1] <= b]
            for name in names:
                per.setdefault(f"rank {rk} {name}", []).append(sum(e[2] - e[1] for e in inside if e[0] == name))
    print(f"{outdir}: {len(steps)} decode steps, per step (median):")
    for k, v in per.items():
        if statistics.median(v):
            print(f"  {k:24s} {statistics.median(v) * 1e6:8.0f} us")
    if 1 not in evs:
        return
    e1 = evs[1]
    layers = [e for e in e0 if e[0] == "_dispatch_one"]
    to_f, back = [], []
    for _, a, b, _ in layers:
        sent = [e for e in e0 if e[0] == "post" and a <= e[1] <= b and e[3].get("send")]
        got = [e for e in e1 if e[0] == "_recv_ctrl" and sent and e[2] >= sent[0][2]]
        if got:
            to_f.append(got[0][2] - sent[-1][2])
            ans = [e for e in e1 if e[0] == "post" and e[3].get("send") and e[1] >= got[0][2]]
            if ans:
                back.append(b - ans[0][2])
    if to_f:
        print(f"  control send posted -> follower has it: {statistics.median(to_f) * 1e6:.0f} us; "
              f"follower's answer posted -> rank 0's dispatch returns: {statistics.median(back) * 1e6:.0f} us")
    for _, a, b, _ in layers[len(layers) // 2:len(layers) // 2 + 6]:
        row = [(f"r0:{e[0]}", e) for e in e0 if a <= e[1] <= b and e[0] != "_dispatch_one"]
        row += [(f"r1:{e[0]}", e) for e in e1 if e[2] >= a - 50e-6 and e[1] <= b + 50e-6 and e[0] != "_recv_ctrl"]
        row.sort(key=lambda x: x[1][1])
        def us(t: float, a: float = a) -> str:
            return f"{1e6 * (t - a):.0f}"
        print(f"  layer {1e6 * (b - a):.0f} us: " + "  ".join(
            f"{n}{'S' if e[3].get('send') else 'R' if 'send' in e[3] else ''}[{us(e[1])},{us(e[2])}]" for n, e in row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--exchange", default="direct")
    ap.add_argument("--summary", action="store_true", help="only summarise OUTDIR's events")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.outdir, a.tokens, a.exchange)
        return 0
    if not a.summary:
        os.makedirs(a.outdir, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), a.outdir, "--worker", "--tokens", str(a.tokens),
               "--exchange", a.exchange]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if a.ranks == 1:
            subprocess.run(cmd, env=env, check=True)
        else:
            from moetier.distributed.launch import spawn

            codes = spawn(cmd, a.ranks, env, timeout_s=600)
            assert codes == [0] * a.ranks, codes
    summary(a.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
