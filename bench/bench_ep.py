"""Expert parallelism, measured (issue 17): loopback overhead, and the bottleneck moving to the link.

    python -m bench.bench_ep loopback [--rounds 2] [--tokens 48]
    python -m bench.bench_ep sweep [--batch 32] [--bw 0.03,0.1,0.3,1,3,10]
    python -m bench.bench_ep plot

``loopback``: decode tok/s of one process (torch path, 1 thread: what every EP rank runs) and of
``P = 2`` ranks on 127.0.0.1 (1 thread each) with the ``direct`` (default) and ``replicated``
exchanges, alternated ``--rounds`` times in one run, on the embedded model (batch 1). Per
message: rank 0's time posting and waiting for step messages (``isend``/``irecv``). Bare round
trips of the message patterns without model work; ``--unpinned`` adds P = 2 without pinning,
``--interference`` two single processes at once, one per CPU (do the CPUs slow each other?),
``--nospin`` P = 2 ``direct`` without polling (``MOETIER_EP_SPIN_US=0``), ``--baseline DIR``
P = 2 ``direct`` run from another source tree (e.g. ``git worktree add DIR <commit>``: old vs
new code alternated in one run). ``P1`` / ``P2`` are the torch path (``native=False``);
``--native`` adds one native process (``P1_native``) and P = 2 with native decode on every rank
(``P2_native``; ratio ``ratio_native`` = P2_native / P1_native per round; on shm its exchange runs
inside the native step, ``moetier/distributed/native_ep.py``), ``--py-exchange`` the same driven
from Python (``P2_native_pyex``, ``MOETIER_EP_NATIVE_EXCHANGE=0``), ``--whole-head`` the native exchange
with rank 0 computing the whole LM head (``P2_native_wholehead``, ``MOETIER_EP_SPLIT_HEAD=0``; by
default its rows are split over the ranks), ``--all-threads`` one native
process with every CPU (``P1_native_all``, ``moetier run``'s default), ``--rank0-experts N``
P = 2 native with rank 0 holding the N hottest experts (``placement.rank0_heavy``);
``--no-replicated`` leaves out P = 2 ``replicated``; ``--out NAME`` names the results file;
``--transport gloo|shm|auto`` sets the P = 2 runs' ``MOETIER_EP_TRANSPORT`` (default auto; replicated
always gloo), ``--transport both`` runs every P = 2 ``direct`` variant on gloo and again on shared
memory (keys ``..._shm``, ratios ``ratio_shm``, ``ratio_native_shm``, ...), alternated.

``sweep`` (root): two network namespaces joined by one veth pair; each end's egress gets a
``tbf`` qdisc (rate BW, bucket ``max(2 frames, BW x 200 us)`` so a layer's message cannot pass
in one burst). One P = 2 job runs every point (rank 0 changes the qdiscs between points),
batched decode (``--batch`` sequences per step, float32). Everything created is removed on exit
(``finally`` + atexit + signal handlers: deleting the namespaces deletes the veth and qdiscs).
Latency is NOT swept: this kernel has no ``sch_netem`` (only tbf / htb / pfifo / clsact load),
so a one-way delay cannot be set with tc here.

Prediction ("planner"): the step measured on the same veth pair with no qdisc (one calibration
point) plus the cluster planner's all-to-all bandwidth term for the shaped link:
``T x direct_remote_pairs(k, P) x (dispatch + combine pair_bytes)`` per MoE layer over the
link rate times its efficiency (TCP payload per 1514-byte frame, 1448/1514); the latency
floors are those of the calibration point (same veth). The binding resource is the "link"
when that bandwidth term exceeds the rest of the step ("local": attention, routers, experts
and Python on rank 0; on this CPU torch path it is overhead, not memory bandwidth); the
crossover is the bandwidth where they are equal (measured: the communication time above the
unshaped floor, interpolated log-log between swept points). ``all_communication`` also
counts the fixed floor (per-collective cost on this machine) against the local time.
Results: ``bench/results/ep_loopback.json``, ``ep_sweep.json``, ``ep_sweep.png``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_result  # noqa: E402

PROMPT = [5, 17, 42, 7]
LINK_EFF = 1448 / 1514  # TCP payload (MSS with timestamps) per Ethernet frame on the wire
NET = "10.77.{}.{}"


# ----------------------------------------------------------------------------------------- worker
def worker(cfg_path: str, out_path: str) -> int:
    """One rank (or the single process when RANK is unset): run every point of the config."""
    import torch

    import moetier
    import moetier.distributed as ep

    cfg = json.loads(Path(cfg_path).read_text())
    dtype = cfg.get("dtype", "float32")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        rank, world = ep.init(timeout_s=120.0)
        placement = None
        if cfg.get("device_experts"):  # a placement of the bench's own (--rank0-experts)
            from moetier.distributed.placement import EPPlacement

            placement = EPPlacement(sum(len(d) for d in cfg["device_experts"]),
                                    tuple(tuple(d) for d in cfg["device_experts"]))
        model, group = ep.load(cfg.get("model"), rank, world, placement, dtype=dtype, tokenizer=False, threads=1,
                               exchange=cfg.get("exchange", ep.DEFAULT_EXCHANGE), native=cfg.get("native", False))
        pingpong = cfg.get("pingpong", 0) and pingpong_s(rank, world, group.ctrl_bytes, cfg["pingpong"], group)
        if rank != 0:
            group.serve(model)
            ep.shutdown()
            return 0
    else:
        model = moetier.load(cfg.get("model"), dtype=dtype, tokenizer=False,
                             native=None if cfg.get("native") else False, threads=cfg.get("threads", 1))
        assert not cfg.get("native") or model.native_reason is None, model.native_reason
    results = []
    for pt in cfg["points"]:
        for cmd in pt.get("tc", []):
            subprocess.run(cmd, check=True)
        n, warm = pt["steps"], pt.get("warmup", 3)
        if pt["name"] == "prefill":  # an N-token prompt into a fresh sequence per step
            N = pt["prompt"]
            prompt = [(13 * i + 5) % model.spec.vocab_size for i in range(N)]
            B = N  # tokens per timed step

            def run_step(i: int, prompt: list[int] = prompt, N: int = N) -> None:
                model.step([(model.new_sequence(capacity=N + 1), prompt)])
        else:  # B sequences, one token each per step
            B = pt["batch"]
            seqs = [model.new_sequence(capacity=len(PROMPT) + n + warm + 2) for _ in range(B)]
            last = [torch.cat([model.step([(s, [(p + 13 * b) % 4000 for p in PROMPT])]) for b, s in enumerate(seqs)])]

            def run_step(i: int, seqs: list = seqs, last: list = last) -> None:
                toks = last[0].argmax(dim=-1).tolist()
                last[0] = model.step([(s, [t]) for s, t in zip(seqs, toks)])
        times, before, cpu0, th0 = [], None, 0.0, 0.0
        for i in range(warm + n):
            if i == warm:
                before = dict(vars(group.stats)) if group else None
                cpu0, th0 = time.process_time(), time.thread_time()
            t0 = time.perf_counter()
            run_step(i)
            if i >= warm:
                times.append(time.perf_counter() - t0)
        r = {"name": pt["name"], "batch": B, "steps": n, "step_s": statistics.median(times),
             "process_cpu_s_per_step": (time.process_time() - cpu0) / n,  # this process (rank 0), all threads
             "main_thread_cpu_s_per_step": (time.thread_time() - th0) / n,
             "step_s_mean": sum(times) / n, "tokens_per_s": B * n / sum(times)}
        if group is not None:
            after = vars(group.stats)
            d = {k: (after[k] - before[k]) / n for k in after}  # per step
            r.update({f"{k}_per_step": v for k, v in d.items()})
            r["local_s_per_step"] = r["step_s_mean"] - d["comm_s"]
            r["collective_s"] = d["comm_s"] / max(1.0, d["collectives"])
            r["collectives_per_step"] = d["collectives"]
            r["transport"] = group.transport
        results.append(r)
        print(json.dumps(r), flush=True)
    out = {"points": results, "pingpong_round_trip_s": pingpong if world > 1 else None,
           "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                       "os_threads": len(os.listdir("/proc/self/task")), "cpus": sorted(os.sched_getaffinity(0))},
           "hidden": model.spec.hidden_size, "top_k": model.spec.top_k,
           "moe_layers": len(model.spec.moe_layer_ids), "world": world, "dtype": str(model.dtype)}
    if group is not None:
        out["per_rank"] = group.stop()
        ep.shutdown()
    Path(out_path).write_text(json.dumps(out))
    return 0


def pingpong_s(rank: int, world: int, nbytes: int, n: int, group: Any = None) -> dict[str, float]:
    """Median round trip of the decode pattern without model work, per message pattern:
    rank 0 -> every follower (one ``nbytes`` control message), then every follower -> rank 0
    (one hidden row back), what one MoE layer of a decode step costs beyond compute.
    ``all_to_all_single`` (two collectives: what the executor used before) and ``isend/irecv``
    (point-to-point, the receive posted first: what it uses now), interleaved in blocks of 20
    so load drifts hit both alike; ``shm``: the same pattern over the group's shared-memory rings
    (a control message out, an answer back) when the group's transport is shm."""
    import torch
    import torch.distributed as dist

    P, row = world, 4096
    out_msg, back = torch.zeros(P - 1, nbytes, dtype=torch.uint8), torch.zeros(row, dtype=torch.uint8)
    got_back = torch.empty(P - 1, row, dtype=torch.uint8)
    ctrl = torch.empty(nbytes, dtype=torch.uint8)
    e = torch.empty(0, nbytes, dtype=torch.uint8)

    def a2a() -> None:
        if rank == 0:
            dist.all_to_all_single(e, out_msg, [0] * P, [0] + [1] * (P - 1))
            dist.all_to_all_single(got_back, torch.empty(0, row, dtype=torch.uint8), [0] + [1] * (P - 1), [0] * P)
        else:
            dist.all_to_all_single(ctrl[None], e, [1] + [0] * (P - 1), [0] * P)
            dist.all_to_all_single(torch.empty(0, row, dtype=torch.uint8), back[None], [0] * P, [1] + [0] * (P - 1))

    peers = [r for r in range(P) if r != rank]
    posted: list = []

    def exchange() -> None:  # replicated: every rank sends one row to every other and receives theirs,
        # the receives posted one exchange ahead (as the executor does)
        if not posted:
            posted.extend(dist.irecv(torch.empty(row, dtype=torch.uint8), r, tag=4) for r in peers)
        now = list(posted)
        posted[:] = [dist.irecv(torch.empty(row, dtype=torch.uint8), r, tag=4) for r in peers]
        ws = now + [dist.isend(back, r, tag=4) for r in peers]
        for w in ws:
            w.wait()

    def p2p() -> None:
        if rank == 0:
            ws = [dist.irecv(got_back[r - 1], r, tag=3) for r in range(1, P)]
            ws += [dist.isend(out_msg[r - 1], r, tag=1) for r in range(1, P)]
            for w in ws:
                w.wait()
        else:
            dist.irecv(ctrl, 0, tag=1).wait()
            dist.isend(back, 0, tag=3).wait()

    def over_shm() -> None:  # the group's own rings (the same count of messages on both sides: in step)
        tr = group._tr
        if rank == 0:
            with group._lock:  # no heartbeat ping in between
                tr.send([(r, out_msg[r - 1]) for r in range(1, P)])
                for r in range(1, P):
                    tr.answer(r)
        else:
            tr.recv_ctrl()
            tr.reply(answer)

    pats = (("all_to_all_single", a2a), ("isend/irecv", p2p), ("exchange", exchange))
    if group is not None and group.transport == "shm":
        answer = torch.zeros(group._answer_bytes(), dtype=torch.uint8)
        pats += (("shm", over_shm),)
    times: dict[str, list[float]] = {name: [] for name, _ in pats}
    for _, f in pats:  # warm-up
        for _ in range(20):
            f()
    for _ in range(max(1, n // 20)):
        for name, f in pats:
            for _ in range(20):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    for r in peers:  # answer the last posted receives
        dist.isend(back, r, tag=4).wait()
    for w in posted:
        w.wait()
    return {k: statistics.median(v) for k, v in times.items()}


def _worker_cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.bench_ep", "worker", str(cfg), str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MOETIER_EP_TIMEOUT": "120"}


# --------------------------------------------------------------------------------------- loopback
def point(args: argparse.Namespace) -> dict:
    """The measured step of ``--point``: decode (one sequence, ``--tokens`` steps), ``batch:B`` (B
    sequences, a token each per step: the server's batched step), ``prefill:N`` (an N-token prompt
    into a fresh sequence, ``--tokens`` // 8 times, at least 3). tok/s counts every token of a step."""
    kind, _, num = args.point.partition(":")
    if kind == "decode" and not num:
        return {"name": "decode", "batch": 1, "steps": args.tokens, "warmup": 3}
    if kind == "batch" and num.isdigit() and int(num) > 0:
        return {"name": "decode", "batch": int(num), "steps": args.tokens, "warmup": 3}
    if kind == "prefill" and num.isdigit() and int(num) > 0:
        return {"name": "prefill", "batch": 1, "prompt": int(num), "steps": max(3, args.tokens // 8), "warmup": 1}
    raise SystemExit(f"--point {args.point}: expected decode, batch:B or prefill:N")


def loopback(args: argparse.Namespace) -> None:
    from moetier.distributed.launch import spawn

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ep_{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    variants = {"P1": "direct", "P2": "direct"}  # key -> --ep-exchange
    if not args.no_replicated:
        variants["P2_replicated"] = "replicated"
    args.native = args.native or args.py_exchange or args.whole_head
    if args.native:  # native decode: one native process, and P = 2 direct with native decode on every rank
        variants |= {"P1_native": "direct", "P2_native": "direct"}
    if args.native and args.all_threads:  # one native process with every CPU (moetier run's default)
        variants["P1_native_all"] = "direct"
    if args.py_exchange:  # the same with the exchange in Python (MOETIER_EP_NATIVE_EXCHANGE=0; shm only differs)
        variants["P2_native_pyex"] = "direct"
    if args.whole_head:  # the native exchange without splitting the LM head (MOETIER_EP_SPLIT_HEAD=0)
        variants["P2_native_wholehead"] = "direct"
    heavy = None
    if args.rank0_experts:  # rank 0 (which runs attention too) holds the N hottest experts, rank 1 the rest
        from moetier.distributed.placement import profile_loads, rank0_heavy
        from moetier.runtime import EMBEDDED_DIR

        if args.model:  # another model: uniform loads over its experts (rank 0 holds experts 0..N-1)
            import numpy as np

            from moetier.spec import load_spec

            loads = np.ones(load_spec(args.model).num_experts)
        else:
            loads = profile_loads(EMBEDDED_DIR / "routing_profile.json")
        heavy = [list(d) for d in rank0_heavy(loads, 2, args.rank0_experts).device_experts]
        variants[f"P2_native_rank0_{args.rank0_experts}"] = "direct"
    if args.unpinned:
        variants |= {"P2_unpinned": "direct", "P2_replicated_unpinned": "replicated"}
    if args.interference:
        variants["P1x2"] = "direct"
    if args.nospin:
        variants["P2_nospin"] = "direct"
    if args.baseline:
        variants["P2_baseline"] = "direct"
    if args.transport == "both":  # the P = 2 direct variants on gloo, and again on shared memory ("_shm")
        variants |= {f"{k}_shm": x for k, x in variants.items()
                     if k.startswith("P2") and x == "direct" and not k.endswith(("_baseline", "_unpinned"))}
    for key, exchange in variants.items():
        (tmp / f"cfg_{key}.json").write_text(json.dumps({
            "dtype": args.dtype, "pingpong": 400 if key in ("P2", "P2_shm") else 0, "exchange": exchange,
            "model": args.model,
            "native": "_native" in key, "device_experts": heavy if "_rank0_" in key else None,
            "threads": len(os.sched_getaffinity(0)) if key == "P1_native_all" else 1,
            "points": [point(args)]}))
    rounds = []
    load0 = os.getloadavg()
    for i in range(args.rounds):
        row = {}
        for key in variants:  # side by side, alternating
            cfg, out = tmp / f"cfg_{key}.json", tmp / f"out_{key}.json"
            if key in ("P1", "P1_native", "P1_native_all"):
                env = {**_env(), **({"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
                                    if key == "P1_native_all" else {})}
                subprocess.run(_worker_cmd(cfg, out), env=env, check=True, stdout=subprocess.DEVNULL)
            elif key == "P1x2":  # two single processes at once, each pinned to its own CPU: do the CPUs interfere?
                cpus = sorted(os.sched_getaffinity(0))[:2]
                outs = [tmp / f"out_{key}_{c}.json" for c in cpus]
                procs = [subprocess.Popen(_worker_cmd(tmp / "cfg_P1.json", o), env=_env(), stdout=subprocess.DEVNULL,
                                          preexec_fn=lambda c=c: os.sched_setaffinity(0, [c]))
                         for c, o in zip(cpus, outs)]
                assert [q.wait() for q in procs] == [0, 0]
                pts = [json.loads(o.read_text())["points"][0] for o in outs]
                row[key] = {"tokens_per_s": statistics.mean(q["tokens_per_s"] for q in pts), "each": pts}
                continue
            else:  # each rank pinned to its own core (the default), or not (MOETIER_EP_PIN=0)
                env = {**_env(), **({"MOETIER_EP_PIN": "0"} if key.endswith("_unpinned") else {}),
                       **({"MOETIER_EP_SPIN_US": "0"} if "_nospin" in key else {}),
                       **({"MOETIER_EP_NATIVE_EXCHANGE": "0"} if "_pyex" in key else {}),
                       **({"MOETIER_EP_SPLIT_HEAD": "0"} if "_wholehead" in key else {}),
                       "MOETIER_EP_TRANSPORT": "shm" if key.endswith("_shm") else
                       "gloo" if args.transport == "both" or variants[key] == "replicated" else args.transport}
                cmd = _worker_cmd(cfg, out)
                if key.endswith("_baseline"):  # that tree's bench_ep.py puts its own root first on sys.path
                    base = Path(args.baseline).resolve()
                    cmd = [sys.executable, str(base / "bench" / "bench_ep.py"), *cmd[3:]]
                    env["PYTHONPATH"] = str(base)
                codes = spawn(cmd, 2, env, timeout_s=600)
                assert codes == [0, 0], codes
            got = json.loads(out.read_text())
            row[key] = got["points"][0]
            row[f"threads_{key}"] = got["threads"]
            if key == "P2":
                row["pingpong_round_trip_s"] = got["pingpong_round_trip_s"]
            if key == "P2_shm":  # the same patterns measured in the shm job, with the shm rings' round trip
                row["pingpong_round_trip_s_shm_job"] = got["pingpong_round_trip_s"]
        p1 = row["P1"]["tokens_per_s"]
        row["ratio"] = row["P2"]["tokens_per_s"] / p1
        for key in variants:
            if key not in ("P1", "P2", "P1_native", "P2_native", "P1_native_all") and "_native" not in key:
                row["ratio" + key[2:]] = row[key]["tokens_per_s"] / p1
        if args.native:  # the like-for-like ratio: native P = 2 over native P = 1
            p1n = row["P1_native"]["tokens_per_s"]
            row["ratio_native"] = row["P2_native"]["tokens_per_s"] / p1n
            row["ratio_native_over_torch_P1"] = row["P2_native"]["tokens_per_s"] / p1
            row["ratio_P1_native_over_torch"] = p1n / p1
            for key in variants:
                if key.startswith("P2_native_"):
                    row["ratio" + key[2:]] = row[key]["tokens_per_s"] / p1n
            if "P1_native_all" in row:  # P = 2 native over one native process using every CPU
                row["ratio_native_over_all_threads"] = row["P2_native"]["tokens_per_s"] / \
                    row["P1_native_all"]["tokens_per_s"]
        rounds.append(row)
        line = [f"round {i}: P=1 {p1:.1f} tok/s"]
        if args.native:
            line.append(f"P=1 native {row['P1_native']['tokens_per_s']:.1f} tok/s")
        if "P1_native_all" in row:
            line.append(f"P=1 native, {len(os.sched_getaffinity(0))} threads "
                        f"{row['P1_native_all']['tokens_per_s']:.1f} tok/s")
        for key, r in ((k, row[k]) for k in variants if k not in ("P1", "P1x2", "P1_native", "P1_native_all")):
            base = row["P1_native"]["tokens_per_s"] if "_native" in key else p1
            line.append(f"{key} [{r['transport']}] {r['tokens_per_s']:.1f} tok/s (x{r['tokens_per_s'] / base:.2f}; "
                        f"{r['collectives_per_step']:.0f} msgs/token at {r['collective_s'] * 1e6:.0f} us, "
                        f"comm {r['comm_s_per_step'] * 1e3:.2f} ms/token, rank 0 CPU "
                        f"{r['process_cpu_s_per_step'] * 1e3:.2f} ms/token)")
        if "P1x2" in row:
            line.append(f"two P=1 processes at once: {row['P1x2']['tokens_per_s']:.1f} tok/s each "
                        f"(x{row['ratiox2']:.2f} of one alone)")
        print("; ".join(line) + "; bare round trips: " + ", ".join(
            f"{k} {v * 1e6:.0f} us" for k, v in row["pingpong_round_trip_s"].items())
            + ("; in the shm job: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in
                                                row["pingpong_round_trip_s_shm_job"].items())
               if "pingpong_round_trip_s_shm_job" in row else ""), flush=True)
    load = os.getloadavg()
    ratios = ["ratio" + k[2:] for k in variants if k not in ("P1", "P1_native", "P2_native", "P1_native_all")]
    if args.native:
        ratios += ["ratio_native", "ratio_native_over_torch_P1", "ratio_P1_native_over_torch"]
    if "P1_native_all" in variants:
        ratios.append("ratio_native_over_all_threads")
    res = {"model": args.model or "embedded", "dtype": args.dtype, "tokens": args.tokens, "point": args.point,
           "rounds": rounds,
           **{"median_" + k: statistics.median(r[k] for r in rounds) for k in ratios},
           "median_tokens_per_s": {k: statistics.median(r[k]["tokens_per_s"] for r in rounds) for k in variants},
           "loadavg_start": load0, "loadavg": load,
           "command": " ".join(["python -m bench.bench_ep loopback", *sys.argv[2:]])}
    print("median ratios: " + ", ".join(f"{k} {res['median_' + k]:.2f}" for k in ratios)
          + f" (load average {load0[0]:.1f} -> {load[0]:.1f})")
    print("wrote", write_result(args.out, res))


# ------------------------------------------------------------------------------------------ netns
class Link:
    """Two namespaces joined by a veth pair; every created object is removed by :meth:`close`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = [f"mtep{tag}a", f"mtep{tag}b"]
        self.dev = [f"mtv{tag}a", f"mtv{tag}b"]
        sub = os.getpid() % 200 + 20
        self.ip = [NET.format(sub, 1), NET.format(sub, 2)]
        self.closed = False
        atexit.register(self.close)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        for ns in self.ns:
            self._ip("netns", "add", ns)
        self._ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, ip in zip(self.ns, self.dev, self.ip):
            self._ip("link", "set", dev, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        self.shaped = False

    @staticmethod
    def _ip(*a: str) -> None:
        subprocess.run(["ip", *a], check=True)

    def _on_signal(self, signum, frame) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def tc_cmds(self, gbit: float | None) -> list[list[str]]:
        """tbf on both ends' egress (``replace`` creates or changes; None = remove)."""
        cmds = []
        for ns, dev in zip(self.ns, self.dev):
            if gbit is None:
                cmds.append(["sh", "-c", f"tc -n {ns} qdisc del dev {dev} root 2>/dev/null || true"])
            else:
                burst = max(2 * 1514, int(gbit * 1e9 / 8 * 200e-6))
                cmds.append(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                             f"{gbit * 1e3:.0f}mbit", "burst", str(burst), "latency", "200ms"])
        return cmds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ns in self.ns:  # deleting a namespace deletes its veth end, the peer and the qdiscs
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def sweep(args: argparse.Namespace) -> None:
    from moetier.distributed.launch import free_port

    bws = [float(x) for x in args.bw.split(",")]
    link = Link()
    procs: list[subprocess.Popen] = []
    try:
        points = [{"name": "warm-up (not used)", "gbit": None, "round": -1, "tc": link.tc_cmds(None)}]
        for rnd in range(args.rounds):  # interleaved rounds: load drifts hit every point alike
            points.append({"name": "veth, no qdisc", "gbit": None, "round": rnd, "tc": link.tc_cmds(None)})
            for g in sorted(bws, reverse=True):
                points.append({"name": f"{g:g} Gbit/s", "gbit": g, "round": rnd, "tc": link.tc_cmds(g)})
        for p in points:
            p.update(batch=args.batch, steps=args.steps, warmup=3)
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ep_{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        cfg, out = tmp / "cfg.json", tmp / "out.json"
        cfg.write_text(json.dumps({"dtype": args.dtype, "points": points}))
        port = str(free_port())
        for r in range(2):
            env = {**_env(), "MASTER_ADDR": link.ip[0], "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(r),
                   "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GLOO_SOCKET_IFNAME": link.dev[r]}
            procs.append(subprocess.Popen(["ip", "netns", "exec", link.ns[r], *_worker_cmd(cfg, out)], env=env,
                                          stdout=None if r == 0 else subprocess.DEVNULL))
        codes = [p.wait(timeout=3600) for p in procs]
        if codes != [0, 0]:
            raise SystemExit(f"sweep: ranks exited with {codes}")
        got = json.loads(out.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        link.close()
    res = predict(got, points)
    res["raw"] = {"measured": got, "points": [{k: v for k, v in p.items() if k != "tc"} for p in points]}
    res["command"] = " ".join(["python -m bench.bench_ep sweep", *sys.argv[2:]])
    res["loadavg"] = os.getloadavg()
    print("wrote", write_result("ep_sweep", res))
    plot()


def predict(got: dict, points: list[dict]) -> dict:
    """Measured points next to the planner's all-to-all term over the calibration step."""
    from moetier.planner.cluster import direct_remote_pairs, pair_bytes

    dt = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}[got["dtype"]]
    H, k, L, P = got["hidden"], got["top_k"], got["moe_layers"], got["world"]
    keys = ("step_s_mean", "comm_s_per_step", "local_s_per_step", "tokens_per_s", "dispatch_bytes_sent_per_step",
            "combine_bytes_recv_per_step", "remote_pairs_per_step", "collective_s")
    by: dict = {}
    for p, m in zip(points[1:], got["points"][1:]):  # the first point warms the job up
        by.setdefault(p["gbit"], []).append(m)
    # per bandwidth: the median over rounds of each round's figures
    med = {g: {"name": ms[0]["name"], "batch": ms[0]["batch"], "rounds": len(ms),
               **{k: statistics.median(m[k] for m in ms) for k in keys}, "by_round": ms} for g, ms in by.items()}
    cal = med[None]  # veth without a qdisc: the calibration step
    B = cal["batch"]
    remote, _ = direct_remote_pairs(k, P)
    bytes_step = B * remote * 2 * pair_bytes(H, dt) * L  # dispatch + combine, every MoE layer (planner)
    base_comm = cal["comm_s_per_step"]
    base_local = cal["step_s_mean"] - base_comm
    rows = []
    for g, m in sorted(med.items(), key=lambda x: -(x[0] or math.inf)):
        comm = base_comm + (bytes_step / (g * 1e9 / 8 * LINK_EFF) if g else 0.0)
        step = base_local + comm
        rows.append({**m, "gbit": g, "planner_step_s": step, "planner_tokens_per_s": B / step,
                     "planner_comm_s": comm, "planner_local_s": base_local,
                     # binding: the link's bandwidth term (communication above the unshaped floor) vs local
                     "planner_binding": "link" if comm - base_comm > base_local else "local",
                     "measured_binding": ("link" if m["comm_s_per_step"] - base_comm > m["local_s_per_step"]
                                          else "local"),
                     "error": m["step_s_mean"] / step - 1.0,
                     "measured_bytes_per_step": m["dispatch_bytes_sent_per_step"] + m["combine_bytes_recv_per_step"]})
    shaped = sorted((r for r in rows if r["gbit"]), key=lambda r: r["gbit"])
    for r in shaped:  # the link's bandwidth term alone: communication above the unshaped floor
        r["measured_link_s"] = r["comm_s_per_step"] - base_comm  # may be < 0 (noise) where the link is idle
        r["planner_link_s"] = r["planner_comm_s"] - base_comm

    def crossing(key_comm: str) -> float | None:  # log-log interpolation of comm/local around 1
        for a, b in zip(shaped, shaped[1:]):
            fa = math.log(max(a[key_comm], 1e-6) / a["local_s_per_step"])
            fb = math.log(max(b[key_comm], 1e-6) / b["local_s_per_step"])
            if fa >= 0 > fb:
                t = fa / (fa - fb)
                return math.exp(math.log(a["gbit"]) + t * (math.log(b["gbit"]) - math.log(a["gbit"])))
        return None

    gbit = 8 / 1e9
    cross = {
        # where the link's bandwidth term equals the local step (the binding resource moves to the link)
        "bandwidth_term": {"planner": bytes_step / (LINK_EFF * base_local) * gbit,
                           "measured": crossing("measured_link_s")},
        # where ALL communication (incl. the fixed per-collective floor of this machine) equals the local step
        "all_communication": {
            "planner": (bytes_step / (LINK_EFF * (base_local - base_comm)) * gbit if base_local > base_comm
                        else math.inf),
            "measured": crossing("comm_s_per_step")},
    }
    return {"model": "embedded", "dtype": dt, "batch": B, "ranks": P, "hidden": H, "top_k": k, "moe_layers": L,
            "planner_bytes_per_step": bytes_step, "link_eff": LINK_EFF, "points": rows,
            "calibration": {"step_s": cal["step_s_mean"], "comm_s": base_comm, "local_s": base_local},
            "crossover_gbit": cross,
            "max_abs_error_shaped": max(abs(r["error"]) for r in shaped),
            "calibration_step_s_by_round": [m["step_s_mean"] for m in cal["by_round"]],
            "per_rank": got.get("per_rank")}


# ------------------------------------------------------------------------------------------- plot
def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads((RESULTS / "ep_sweep.json").read_text())
    if "raw" in res:  # recompute the prediction from the stored measurements (same formula as the run)
        res.update(predict(res["raw"]["measured"], res["raw"]["points"]))
        (RESULTS / "ep_sweep.json").write_text(json.dumps(res, indent=2) + "\n")
    rs = sorted((r for r in res["points"] if r["gbit"]), key=lambda r: r["gbit"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["gbit"] for r in rs]
    ax.plot(x, [r["tokens_per_s"] for r in rs], "o-", label="measured (P = 2, veth + tbf)")
    ax.plot(x, [r["planner_tokens_per_s"] for r in rs], "s--", label="planner: calibration step + all-to-all")
    for r in rs:
        comm = r["planner_binding"] == "link"
        ax.annotate("link" if comm else "local", (r["gbit"], r["planner_tokens_per_s"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8, color="tab:red" if comm else "tab:green")
    cx = res["crossover_gbit"]["bandwidth_term"]
    if cx["planner"] and math.isfinite(cx["planner"]):
        ax.axvline(cx["planner"], color="tab:orange", ls=":", label=f"planner crossover {cx['planner']:.2g} Gbit/s")
    if cx["measured"]:
        ax.axvline(cx["measured"], color="tab:blue", ls=":", label=f"measured crossover {cx['measured']:.2g} Gbit/s")
    ax.set_ylabel(f"decode tok/s (batch {res['batch']})")
    bx.plot(x, [r["comm_s_per_step"] * 1e3 for r in rs], "o-", color="tab:red", label="measured communication")
    bx.plot(x, [r["measured_link_s"] * 1e3 if r["measured_link_s"] > 1e-4 else math.nan for r in rs], "o:",
            color="tab:purple",
            label="measured communication above the unshaped floor")
    bx.plot(x, [r["local_s_per_step"] * 1e3 for r in rs], "o-", color="tab:green", label="measured local")
    bx.plot(x, [r["planner_comm_s"] * 1e3 for r in rs], "s--", color="tab:red", alpha=0.6,
            label="planner communication")
    bx.plot(x, [r["planner_link_s"] * 1e3 for r in rs], "s--", color="tab:purple", alpha=0.6,
            label="planner bandwidth term")
    bx.plot(x, [r["planner_local_s"] * 1e3 for r in rs], "s--", color="tab:green", alpha=0.6, label="planner local")
    bx.set_yscale("log")
    bx.set_ylim(bottom=0.3)
    bx.set_ylabel("ms per step (rank 0)")
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel("link bandwidth (Gbit/s, each direction)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"Expert parallelism over a shaped link: embedded qwen3_moe, 2 ranks, {res['dtype']}; "
                 "binding resource labelled (planner)", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "ep_sweep.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("cfg")
    w.add_argument("out")
    lb = sub.add_parser("loopback")
    lb.add_argument("--rounds", type=int, default=2)
    lb.add_argument("--tokens", type=int, default=48)
    lb.add_argument("--dtype", default="float32")
    lb.add_argument("--model", default=None, help="a model directory (default: the embedded model)")
    lb.add_argument("--unpinned", action="store_true", help="also P = 2 without pinning (MOETIER_EP_PIN=0)")
    lb.add_argument("--nospin", action="store_true", help="also P = 2 direct without polling (MOETIER_EP_SPIN_US=0)")
    lb.add_argument("--whole-head", action="store_true",
                    help="with --native: also P = 2 native with rank 0 computing the whole LM head "
                         "(MOETIER_EP_SPLIT_HEAD=0) instead of splitting its rows over the ranks")
    lb.add_argument("--all-threads", action="store_true",
                    help="with --native: also one native process with every CPU (P1_native_all; moetier run's "
                         "default), ratio_native_over_all_threads = P2_native over it")
    lb.add_argument("--py-exchange", action="store_true",
                    help="with --native: also P = 2 native with the shm exchange driven from Python "
                         "(MOETIER_EP_NATIVE_EXCHANGE=0) instead of inside the native step")
    lb.add_argument("--baseline", metavar="DIR", help="also P = 2 direct run from the source tree DIR (old code)")
    lb.add_argument("--native", action="store_true",
                    help="also one native process and P = 2 direct with native decode on every rank")
    lb.add_argument("--no-replicated", action="store_true", help="leave out P = 2 replicated (shorter runs)")
    lb.add_argument("--point", default="decode", metavar="KIND",
                    help="the step measured: decode (default), batch:B (B sequences a token each) or prefill:N "
                         "(an N-token prompt)")
    lb.add_argument("--rank0-experts", type=int, default=0, metavar="N",
                    help="with --native: also P = 2 native with rank 0 holding the N hottest experts (routing profile)")
    lb.add_argument("--transport", choices=("gloo", "shm", "auto", "both"), default="auto",
                    help="P = 2 step messages (MOETIER_EP_TRANSPORT); both: every P = 2 direct variant on gloo and "
                         "again on shm (keys ..._shm), alternated")
    lb.add_argument("--out", default="ep_loopback", help="results name (bench/results/NAME.json)")
    lb.add_argument("--interference", action="store_true",
                    help="also two P = 1 processes at once, pinned to one CPU each (how much the CPUs slow each other)")
    sw = sub.add_parser("sweep")
    sw.add_argument("--batch", type=int, default=32)
    sw.add_argument("--steps", type=int, default=8)
    sw.add_argument("--rounds", type=int, default=3)
    sw.add_argument("--bw", default="0.03,0.1,0.3,1,3,10", help="Gbit/s")
    sw.add_argument("--dtype", default="float32")
    sub.add_parser("plot")
    a = ap.parse_args()
    if a.cmd == "worker":
        return worker(a.cfg, a.out)
    {"loopback": loopback, "sweep": sweep, "plot": lambda _: plot()}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
