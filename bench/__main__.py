"""Side-by-side benchmark: moetier vs llama.cpp vs transformers on the same checkpoint.

    python -m bench all                # every scenario, one run
    python -m bench ram overcap        # some scenarios (embedded | ram | overcap)
    python -m bench report [--readme]  # re-render the markdown/PNG (and README block) from the JSON

Each engine runs as its own process (``bench/peers.py``) inside a fresh cgroup v1 memory group
(``bench.common.run_capped``): the scenario's cap, or for in-RAM scenarios a group at the
machine's RAM size, used only to read the cgroup peak. The page cache is dropped before every
engine's process (cold start); each worker does one warm-up generation, then ``--runs`` timed
ones. Results merge into ``bench/results/side_by_side.json`` (re-running one scenario
replaces only that scenario), then ``side_by_side.md`` and ``side_by_side.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.common import RESULTS, parse_worker_output, run_worker  # noqa: F401 (parse_worker_output: re-export)
from bench.scenarios import (
    EXTRA_SCENARIOS,
    GIB,
    PEERS,
    REPO,
    SCENARIOS,
    Scenario,
    bench_cache,
    ensure_gguf,
    gguf_outtype,
    llama_python,
    model_bytes,
    prompt_ids,
)

STEM = "side_by_side"


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def engine_command(engine: str, model: Path, dtype: str, ids: list[int], args: argparse.Namespace,
                   options: dict[str, Any] | None) -> list[str]:
    py = str(llama_python()) if engine == "llama_cpp" else sys.executable
    cmd = ["nice", "-n", str(args.nice)] if args.nice else []
    cmd += [py, str(PEERS), engine, str(model), "--prompt-ids", ",".join(map(str, ids)), "--tokens",
            str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads), "--dtype", dtype]
    if engine == "moetier" and args.profile_steps:
        cmd += ["--profile-steps", str(args.profile_steps)]
    if options:
        cmd += ["--", json.dumps(options)]
    return cmd


def run_engine(engine: str, cmd: list[str], cap: int | None, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    limit = cap if cap is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    _log(f"{engine}: {' '.join(cmd[:6])} ... (cap {limit / GIB:.2f} GiB)")
    res = run_worker(cmd, cap, timeout=timeout, env=env)
    if res["status"] == "ok":
        res["output_ids_sample"] = res.pop("output_ids", [])[:32]
    return res


def planner_figures(d: Path, precision: str, prompt_tokens: int, decode_tokens: int, cap: int | None,
                    moetier: dict[str, Any] | None) -> dict[str, Any]:
    """The planner's bound for this scenario on the probed ``cpu`` machine."""
    from moetier.planner.machines import get_machine
    from moetier.planner.roofline import plan, predict_decode_tokens_per_s
    from moetier.spec import load_spec

    spec = load_spec(d)
    machine = get_machine("cpu")
    ctx = prompt_tokens + decode_tokens // 2
    kw: dict[str, Any] = {"batch": 1, "precision": precision}
    if cap is not None:
        kw["fast_mem"] = cap
    dec = plan(spec, machine, context=ctx, **kw)
    pre = plan(spec, machine, context=prompt_tokens, **kw)
    out = {"precision": dec.precision, "context": ctx, "decode_tokens_per_s": dec.decode_tokens_per_s,
           "bottleneck": dec.bottleneck, "prefill_tokens_per_s": pre.prefill_tokens_per_s,
           "prefill_bottleneck": pre.prefill.bottleneck, "hit_rate_planned": dec.hit_rate,
           "decode_times_s": dec.decode.to_json() if hasattr(dec.decode, "to_json") else None}
    h = (moetier or {}).get("hierarchy") or {}
    # the decode bound depends on the decode steps' hit rate (prefill steps touch many experts
    # once for many tokens); older results only have the all-steps rate
    rate = h.get("decode_hit_rate", h.get("hit_rate"))
    if rate is not None:
        try:
            out["decode_tokens_per_s_at_measured_hit_rate"] = predict_decode_tokens_per_s(
                spec, machine, hit_rate=float(rate), cache_bytes=h.get("cache_bytes"),
                precision=precision, context=ctx)
            out["measured_hit_rate"] = rate
            out["measured_hit_rate_kind"] = "decode" if "decode_hit_rate" in h else "all steps"
            out["planned_decode_tokens_per_s"] = out["decode_tokens_per_s"]
            # the bound moetier is held to is the one for the cache it actually had
            out["decode_tokens_per_s"] = out["decode_tokens_per_s_at_measured_hit_rate"]
        except Exception as e:  # planner refuses (e.g. cache larger than the cap)
            out["measured_hit_rate_error"] = str(e)
    return out


def spec_summary(d: Path) -> tuple[str, dict[str, Any]]:
    from moetier.spec import load_spec

    s = load_spec(d)
    info = {"layers": s.num_layers, "hidden": s.hidden_size, "experts": s.num_experts, "top_k": s.top_k,
            "vocab": s.vocab_size, "torch_dtype": s.torch_dtype}
    return (f"{s.num_layers} layers, hidden {s.hidden_size}, {s.num_experts} experts top-{s.top_k}, "
            f"vocab {s.vocab_size}"), info


def run_scenario(sc: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    args = argparse.Namespace(**vars(args))  # per-scenario defaults for --tokens / --prompt-len
    args.tokens = args.tokens or sc.tokens
    args.prompt_len = args.prompt_len or sc.prompt_len
    out: dict[str, Any] = {"title": sc.title, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "notes": list(sc.notes)}
    try:
        d = sc.resolve()
    except (FileNotFoundError, ImportError) as e:
        out["error"] = str(e)
        _log(f"{sc.name}: skipped: {e}")
        return out
    summary, info = spec_summary(d)
    dtype = "float32" if info["torch_dtype"] == "float32" else "bfloat16"
    if args.dtype != "auto":
        dtype = args.dtype
        out["title"] = f"{sc.title} [{dtype}]"
    if args.threads != (os.cpu_count() or 1):
        out["title"] = f"{out['title']} [{args.threads} thread{'s' if args.threads > 1 else ''}]"
    precision = "fp32" if dtype == "float32" else "bf16"
    cap = sc.cap_bytes(d)
    ids = prompt_ids(info["vocab"], args.prompt_len, seed=args.seed)
    out.update(model_dir=str(d), model_name=d.name, model_bytes=model_bytes(d), dtype=dtype, cap_bytes=cap,
               spec=info, spec_summary=summary, prompt_ids=ids)
    engines = [e for e in sc.engines if not args.engines or e in args.engines]
    cmds: dict[str, list[str]] = {}
    prep_failed: dict[str, Any] = {}
    for en in engines:
        model: Path = d
        options: dict[str, Any] | None = None
        if en == "llama_cpp":
            try:
                model = ensure_gguf(d, gguf_outtype(dtype))
            except Exception as e:
                prep_failed[en] = {"status": "failed", "error": f"conversion: {e}"[:2000]}
                continue
            out["gguf"] = str(model)
        elif en in ("moetier", "moetier_torch"):
            options = sc.moetier_options(d, cap) or None
        elif en == "transformers_offload":
            budget = int((cap or 4 * GIB) * 0.5)
            options = {"cpu_bytes": budget, "offload_folder": str(bench_cache() / "offload" / d.name)}
        cmds[en] = engine_command(en, model, dtype, ids, args, options)
    rounds: list[dict[str, Any]] = []
    for rd in range(args.rounds):
        this: dict[str, Any] = {}
        for en, cmd in cmds.items():
            if rd and any(r.get(en, {}).get("status") != "ok" for r in rounds):
                continue  # failed once (oom, crash): not retried
            load0 = os.getloadavg()[0]
            r = run_engine(en, cmd, cap, args.timeout)
            if en == "transformers_offload":  # accelerate rewrites it at every load; don't keep ~GBs
                shutil.rmtree(bench_cache() / "offload" / d.name, ignore_errors=True)
            r["loadavg_1min"] = [load0, os.getloadavg()[0]]
            this[en] = r
            _log(f"{sc.name}/{en} round {rd + 1}/{args.rounds}: {r['status']} decode "
                 f"{report.median(r.get('decode_tokens_per_s_runs') or [float('nan')]):.2f} tok/s "
                 f"(load avg {load0:.1f})")
        rounds.append(this)
    results = {**prep_failed, **{en: report.merge_rounds([rd[en] for rd in rounds if en in rd]) for en in cmds}}
    out["rounds"] = args.rounds
    out["settings"] = {"batch": 1, "prompt_tokens": args.prompt_len, "decode_tokens": args.tokens,
                       "runs": args.runs, "rounds": args.rounds, "threads": args.threads, "warmup_runs": 1,
                       "timeout_s": args.timeout}
    out["round_ratios"] = report.round_ratios(rounds)
    out["engines"] = {n: report.summarize_engine(r) for n, r in results.items()}
    try:
        out["planner"] = planner_figures(d, precision, args.prompt_len, args.tokens, cap,
                                         out["engines"].get("moetier"))
    except Exception as e:
        out["planner"] = None
        out["planner_error"] = f"{type(e).__name__}: {e}"
    return report.finish_scenario(scenario_key(sc.name, args), out)


def scenario_key(name: str, args: argparse.Namespace) -> str:
    """Results key: the scenario name, + ``@fp32`` / ``@bf16`` when --dtype overrides the checkpoint's,
    + ``@t<N>`` when --threads is not the machine's core count."""
    key = name if args.dtype == "auto" else f"{name}@{'fp32' if args.dtype == 'float32' else 'bf16'}"
    return key if args.threads == (os.cpu_count() or 1) else f"{key}@t{args.threads}"


def machine_figures() -> dict[str, Any]:
    try:
        from moetier.planner.probe import get_probe

        rec, _ = get_probe()
        return {k: rec.get(k) for k in ("memory_read_bw", "disk_read_bw", "disk_method", "matmul_flops",
                                        "cores_usable", "ram_bytes", "timestamp_utc")}
    except Exception as e:
        return {"error": str(e)}


def peer_versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        py = bench_cache() / "llama-venv" / "bin" / "python"
        p = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, timeout=60)
        out["llama_cpp_python"] = p.stdout.strip() or None
    except OSError:
        out["llama_cpp_python"] = None
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from moetier.errors import MissingExtraError
    from moetier.extras import require

    try:
        require("bench", "python -m bench")  # the peers, the serve load generator, the plots
    except MissingExtraError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    known = {**SCENARIOS, **EXTRA_SCENARIOS}
    for n in names:
        if n not in known:
            print(f"bench: unknown scenario {n!r} (expected all, {', '.join(SCENARIOS)})", file=sys.stderr)
            return 2
    path = RESULTS / f"{args.out}.json"
    if args.fresh and path.exists():
        path.unlink()
    for n in names:
        _log(f"scenario {n}: {known[n].title}")
        res = run_scenario(known[n], args)
        # re-read just before writing: another `python -m bench` may have added a scenario meanwhile
        payload: dict[str, Any] = report.load_payload(path) if path.exists() else {}
        payload.pop("provenance", None)
        scen = payload.get("scenarios", {})
        scen[scenario_key(n, args)] = res
        _save(args.out, payload, scen, args)
    for p in report.write_outputs(_reload(args.out), RESULTS, args.out):
        _log(f"wrote {p}")
    print(report.render_markdown(_reload(args.out)))
    return 0


def _reload(stem: str) -> dict[str, Any]:
    return report.load_payload(RESULTS / f"{stem}.json")


def _save(stem: str, payload: dict[str, Any], scen: dict[str, Any], args: argparse.Namespace) -> None:
    from bench.common import write_result

    payload.pop("command", None)
    payload.pop("settings", None)  # per scenario now
    cmds = dict(payload.get("commands", {}))
    for n in args.scenarios:
        cmds[scenario_key(n, args)] = "python -m bench " + " ".join(sys.argv[1:])
    payload.update(
        commands=cmds,
        machine=machine_figures(),
        peer_versions=peer_versions(),
        scenarios=report.order_scenarios(scen, list(SCENARIOS)),
    )
    write_result(stem, jsonable(payload))


def jsonable(obj: Any) -> Any:
    """Plain JSON types only (numpy scalars/arrays from the planner become Python values)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def cmd_report(args: argparse.Namespace) -> int:
    path = RESULTS / f"{args.out}.json"
    if not path.exists():
        print(f"bench: {path} not found (run `python -m bench all` first)", file=sys.stderr)
        return 2
    payload = report.load_payload(path)
    payload["scenarios"] = report.order_scenarios(payload.get("scenarios", {}), list(SCENARIOS))
    for name, sc in payload["scenarios"].items():
        if not sc.get("error"):
            report.finish_scenario(name, sc)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    report.write_outputs(payload, RESULTS, args.out)
    block = report.render_readme_block(payload)
    if args.readme:
        readme = Path(args.readme_path) if args.readme_path else Path(__file__).resolve().parent / "README.md"
        readme.write_text(report.replace_marked_block(readme.read_text() if readme.exists() else "", block))
        print(f"updated {readme}", file=sys.stderr)
    print(block)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(prog="python -m bench report")
        ap.add_argument("--readme", action="store_true",
                        help="update the <!-- bench:begin -->...<!-- bench:end --> block of bench/README.md")
        ap.add_argument("--readme-path", default=None, help="another README to update (e.g. README.md)")
        ap.add_argument("--out", default=STEM)
        return cmd_report(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("scenarios", nargs="+", help="all | " + " | ".join(SCENARIOS))
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine process (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="engine processes per engine, interleaved (A B C A B C ...) against load drift")
    ap.add_argument("--tokens", type=int, default=None,
                    help="greedy decode tokens per run (default: 32; overcap 16)")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="prompt tokens, the same ids for every engine (default: 64; overcap 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engines", type=lambda s: s.split(","), default=None, help="subset, comma-separated")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="precision for every engine (auto: the checkpoint's; results key gets @fp32/@bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0, help="run the workers under nice -n N")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine process")
    ap.add_argument("--out", default=STEM, help="results name under bench/results/")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile N moetier decode steps (torch.profiler: where the time goes)")
    ap.add_argument("--fresh", action="store_true", help="do not merge with existing results")
    return cmd_run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
