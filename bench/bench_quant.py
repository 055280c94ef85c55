"""Decode speed of the stored formats side by side: bf16 vs int8 / fp8 / int4 (g32, g128), in RAM.

    python -m bench.bench_quant [--model wide,ram] [--threads auto,1] [--rounds 3] [--tokens 16]

Models (``--model``): ``wide`` builds (or reuses, under ``/tmp/moetier-bench-quant``) a
synthetic qwen3_moe checkpoint of ~0.55 GB bf16 (``scripts/make_wide_model.py``: the embedded
model's 4 layers repeated 4x, experts widened to 704 units, hidden 256; top-4 of 32 experts);
``ram`` is the 2.5 GB synthetic of scenario (b) (``bench_runtime.ensure_synthetic(2.5)``:
hidden 1024, 15 layers, top-8 of 64 experts of 384 units; copies beside it in ``...-quant``).
``moetier quantize`` writes a copy in each format (every linear but embeddings / routers, the
LM head included: int8 / fp8 like the rest, int8 g128 under int4, the fp8 row's head quantized
at load; the int8 and fp8 rows once more with a bf16 head, as the released checkpoints ship;
plus an int4 g32 copy of the routed experts only). Per
model and thread setting: every format is loaded (``moetier.load``;
``native_reason`` recorded: ``None`` = native decode kernels), warmed up with one generation of
the same prompt (pre-touches the weights the prompt routes to), then ``--rounds`` rounds, each
running every format in turn (interleaved, so machine load hits all alike) on the same 32
prompt ids for ``--tokens`` greedy steps; decode tok/s is the median.

Bytes per token are the checkpoint's stored bytes (``stored_census``): routed experts x top_k /
num_experts (the active share) + always-on (attention, norms, routers, LM head; the embedding
table is not counted: one row per token). Stored GB/s = bytes/token x tok/s. Planner bound:
``plan()`` of the checkpoint at its stored formats on the probed ``cpu`` machine (``moetier
probe``: memory bandwidth and the native kernels' rate per format; a numeric ``--threads`` N sees
N cores' worth: one core's memory read and kernel rates at 1), context = prompt + half the
decode; "binds on" is the planner's binding resource (on the probed CPU "memory+compute":
memory time + the dequantizing kernels' time, which add on cores that both stream and compute). Agreement: greedy
tokens equal to bf16's at the same position, out of ``--tokens``. With 1 thread the bench also
records the caller's CPU time per decode step (a generation's thread CPU time minus that of a
prefill-only one, over the decode steps): the work per token, robust to other processes
taking the cores (wall-clock tok/s on a loaded machine is not), and its fraction of the bound
(tokens per CPU second / bound tok/s). Results:
``bench/results/quant_decode.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import median, write_result

ROOT = Path("/tmp/moetier-bench-quant")
REPO = Path(__file__).resolve().parents[1]
# (row name, --format, --group, --experts-only, --keep-head, extra moetier.load options): every linear
# a release quantizes (attention, experts) and the LM head (int8 / fp8 like the rest, int8 g128 under
# int4; ``moetier quantize`` writes FP8 heads bf16, so the fp8 row quantizes its head at load:
# ``quantize="fp8", quantize_all=True`` on the fp8 checkpoint touches only the plain head), the same
# with a bf16 head (``--keep-head``, the released layouts), and one experts-only copy (what
# ``--quantize int4`` gives at load) to separate attention's share
FORMATS = [("bf16", None, None, False, False, {}),
           ("int8 g128", "int8", 128, False, False, {}),
           ("int8 g128 bf16 head", "int8", 128, False, True, {}),
           ("fp8", "fp8", None, False, False, {"quantize": "fp8", "quantize_all": True}),
           ("fp8 bf16 head", "fp8", None, False, True, {}),
           ("int4 g32", "int4", 32, False, False, {}),
           ("int4 g128", "int4", 128, False, False, {}),
           ("int4 g32 experts-only", "int4", 32, True, False, {})]
MODELS = ("wide", "ram")  # the 0.55 GB wide embedded model (hidden 256), the 2.5 GB synthetic (hidden 1024)


def _dir_name(fmt: str, group: int | None, experts_only: bool, keep_head: bool) -> str:
    """The cached copy's directory: ``int8-g128`` (bf16 head, the layout before heads were
    quantized), ``int8-g128-qhead`` (head quantized), ``int4-g32-experts-only``, ``fp8``."""
    name = fmt + (f"-g{group}" if group else "")
    if experts_only:
        return name + "-experts-only"
    return name if keep_head or fmt == "fp8" else name + "-qhead"


def build(model: str = "wide") -> dict[str, tuple[Path, dict]]:
    """The checkpoint directory and load options of each row (copies built once, reused)."""
    if model == "ram":
        from bench.bench_runtime import ensure_synthetic

        src = ensure_synthetic(2.5)
        root = src.parent / (src.name + "-quant")
    else:
        src = ROOT / "bf16"
        root = ROOT
        if not (src / "config.json").is_file():
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_wide_model.py"), "--out", str(src),
                            "--repeat", "4", "--expert-inter", "704"], check=True, stdout=subprocess.DEVNULL)
    rows = {"bf16": (src, {})}
    for name, fmt, group, experts_only, keep_head, extra in FORMATS[1:]:
        out = root / _dir_name(fmt, group, experts_only, keep_head)
        if not (out / "config.json").is_file():
            cmd = [sys.executable, "-m", "moetier", "quantize", str(src), str(out), "--format", fmt]
            cmd += (["--group", str(group)] if group else []) + (["--experts-only"] if experts_only else [])
            cmd += ["--keep-head"] if keep_head and fmt != "fp8" else []
            subprocess.run(cmd, check=True)
        rows[name] = (out, extra)
    return rows


def _head_at_load(m) -> str | None:
    """The census format of an LM head quantized at load over a plain stored one (else None)."""
    from moetier.layers.linear import QLinear

    h = m.net.lm_head
    if not isinstance(h, QLinear):
        return None
    q = h.qweight
    return "fp8" if q.fmt == "fp8_e4m3_block" else f"int{q.meta['bits']}:g{q.block[1]}"


def bytes_per_token(d: Path, m=None) -> tuple[int, int, dict[str, str | None]]:
    """(routed active bytes, always-on bytes, {group: stored format}) of one checkpoint (with the
    LM head at its loaded size when model ``m`` quantized a plain stored head at load)."""
    from moetier.spec import load_spec
    from moetier.weights.stored import stored_census

    spec = load_spec(d)
    st = stored_census(d, spec)
    routed = st.bytes.get("routed_experts", 0) * spec.top_k // spec.num_experts
    fmts = {g: st.format_of(g) for g in st.bytes}
    head = _head_at_load(m) if m is not None else None
    if head is not None and fmts.get("lm_head") in ("bf16", "fp16", "fp32"):
        st.bytes["lm_head"] = m.net.lm_head.qweight.nbytes
        fmts["lm_head"] = head
    always = sum(b for g, b in st.bytes.items() if g not in ("routed_experts", "embedding", "mtp"))
    return routed, always, fmts


def planner_bound(d: Path, context: int, threads: int | None = None, head: str | None = None) -> dict:
    """The planner's decode bound for checkpoint ``d`` in RAM on the probed ``cpu`` machine, at
    its stored formats: with the measured kernel rates, and memory / FLOPs only. ``threads``: the
    machine as a run on that many cores sees it (one core's memory read and kernel rates at 1);
    ``head``: the LM head's format when it was quantized at load (else as stored)."""
    from dataclasses import replace

    from moetier.planner.machines import get_machine
    from moetier.planner.roofline import plan
    from moetier.spec import load_spec
    from moetier.weights.stored import checkpoint_precision

    spec = load_spec(d)
    from moetier.planner.probe import cpu_machine

    m = cpu_machine(cores=threads) if threads else get_machine("cpu")
    prec = checkpoint_precision(d, spec)
    if head is not None:
        prec = re.sub(r"lm_head=(bf16|fp16|fp32)", "lm_head=" + head, prec)
    r = plan(spec, m, context=context, precision=prec)
    mem = plan(spec, replace(m, kernel_rates={}), context=context, precision=prec)
    return {"precision": prec, "decode_tokens_per_s": r.decode_tokens_per_s, "binds_on": r.bottleneck,
            "memory_s": r.decode.memory_s, "kernel_s": r.decode.kernel_s, "kernel_mode": r.decode.kernel_mode,
            "memory_bound_tokens_per_s": mem.decode_tokens_per_s, "kernel_rates": dict(m.kernel_rates),
            "memory_read_bw": m.tier("dram").read_bw}


def run(dirs: dict[str, tuple[Path, dict]], threads: int | None, rounds: int, tokens: int) -> dict:
    import moetier

    models = {n: moetier.load(d, tokenizer=False, dtype="bfloat16", threads=threads, **extra)
              for n, (d, extra) in dirs.items()}
    prompt = [(7 * i + 5) % models["bf16"].spec.vocab_size for i in range(32)]
    for m in models.values():
        m.generate_ids(prompt, tokens, stop_ids=[])  # warm-up: pre-touches the routed weights
    rates: dict[str, list[float]] = {n: [] for n in models}
    cpu: dict[str, list[float]] = {n: [] for n in models}
    ids: dict[str, list[int]] = {}
    for _ in range(rounds):
        for n, m in models.items():
            t0 = time.thread_time()
            g = m.generate_ids(prompt, tokens, stop_ids=[])
            t1 = time.thread_time()
            rates[n].append(g.decode_tokens_per_s)
            ids.setdefault(n, g.ids)
            if threads == 1:  # CPU seconds of the decode steps: the prefill-only run's taken off
                m.generate_ids(prompt, 1, stop_ids=[])
                cpu[n].append((t1 - t0 - (time.thread_time() - t1)) / max(1, g.decode_steps))
    out = {}
    for n, m in models.items():
        d, extra = dirs[n]
        routed, always, fmts = bytes_per_token(d, m)
        tps = median(rates[n])
        out[n] = {"dir": str(d), "load_options": extra, "native_reason": m.native_reason,
                  "thread_setting": m.thread_setting(),
                  "stored_formats": fmts,
                  "decode_tok_s": tps, "rounds": rates[n], "bytes_per_token_routed": routed,
                  "bytes_per_token_always_on": always, "bytes_per_token": routed + always,
                  "stored_gb_s": (routed + always) * tps / 1e9, "ids": ids[n],
                  "agree_with_bf16": sum(a == b for a, b in zip(ids[n], ids["bf16"]))}
        if cpu[n]:  # 1 thread: work per token, robust to machine load (CPU time, not wall time)
            out[n]["decode_cpu_ms_per_token"] = 1e3 * median(cpu[n])
        out[n]["planner"] = planner_bound(d, len(prompt) + tokens // 2, threads, _head_at_load(m))
        out[n]["fraction_of_bound"] = tps / out[n]["planner"]["decode_tokens_per_s"]
        if cpu[n]:  # the same in CPU time: tokens per CPU second of the one decode thread
            out[n]["fraction_of_bound_cpu"] = 1e3 / out[n]["decode_cpu_ms_per_token"] / out[n]["planner"][
                "decode_tokens_per_s"]
    for n in out:
        out[n]["speedup_vs_bf16"] = out[n]["decode_tok_s"] / out["bf16"]["decode_tok_s"]
        if "decode_cpu_ms_per_token" in out[n]:
            out[n]["cpu_speedup_vs_bf16"] = out["bf16"]["decode_cpu_ms_per_token"] / out[n]["decode_cpu_ms_per_token"]
        out[n]["bytes_ratio_vs_bf16"] = out[n]["bytes_per_token"] / out["bf16"]["bytes_per_token"]
    del models
    gc.collect()
    return out


def table(res: dict, tokens: int) -> str:
    lines = ["| threads | format | native | MB/token (routed + always-on) | bytes vs bf16 | decode tok/s | vs bf16 "
             "| stored GB/s | planner bound tok/s (binds on) | of bound | 1-thread CPU ms/token (vs bf16) "
             "| of bound (CPU time) | greedy = bf16 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for th, rows in res.items():
        for n, r in rows.items():
            lines.append(f"| {th} | {n} | {'yes' if r['native_reason'] is None else 'no'} "
                         f"| {r['bytes_per_token'] / 1e6:.1f} ({r['bytes_per_token_routed'] / 1e6:.1f} + "
                         f"{r['bytes_per_token_always_on'] / 1e6:.1f}) | {r['bytes_ratio_vs_bf16']:.2f} "
                         f"| {r['decode_tok_s']:.1f} | {r['speedup_vs_bf16']:.2f}x | {r['stored_gb_s']:.2f} "
                         f"| {r['planner']['decode_tokens_per_s']:.1f} ({r['planner']['binds_on']}) "
                         f"| {r['fraction_of_bound']:.0%} "
                         + (f"| {r['decode_cpu_ms_per_token']:.2f} ({r['cpu_speedup_vs_bf16']:.2f}x) "
                            f"| {r['fraction_of_bound_cpu']:.0%} " if "decode_cpu_ms_per_token" in r else "| - | - ")
                         + f"| {r['agree_with_bf16']}/{tokens} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="auto,1", help="comma list of thread settings (auto or a number)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--model", default="wide", help="comma list of: wide (0.55 GB, hidden 256), "
                   "ram (the 2.5 GB synthetic of scenario (b), hidden 1024)")
    args = p.parse_args(argv)
    models = args.model.split(",")
    if any(m not in MODELS for m in models):
        p.error(f"--model {args.model!r}: expected a comma list of {', '.join(MODELS)}")
    res = {}
    for model in models:
        dirs = build(model)
        for th in args.threads.split(","):
            key = th if model == "wide" else f"{model} {th}"
            res[key] = run(dirs, None if th == "auto" else int(th), args.rounds, args.tokens)
            print(f"[quant] {model} threads {th} done", file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    path = write_result("quant_decode", {"command": "python -m bench.bench_quant " + " ".join(argv or sys.argv[1:]),
                                         "settings": vars(args), "loadavg_1_5_15": load, "results": res})
    print(table(res, args.tokens))
    print(f"[quant] load average {' '.join(load)}; wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
