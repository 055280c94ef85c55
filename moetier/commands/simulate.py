"""``moetier simulate TRACE --policy NAME --cache N [--json] [--machine M] [--model NAME]``.

Replays a routing trace (a moetier .npz, or a third-party file imported on the fly) through
per-layer expert caches of N experts under a cache policy, and prints the hit rate per layer
and overall. With ``--machine`` the hit rate becomes a predicted decode speed through the
planner's roofline model.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from moetier.errors import MoetierError
from moetier.weights.policies import policy_names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="replay a routing trace through an expert-cache policy (hit rates, predicted tokens/s)",
        description="Replay a routing trace through per-layer expert caches. Every top-k selection of "
        "every row is one access.",
        epilog="examples (embedded.npz: recorded by `moetier trace --prompts examples/prompts.txt --out "
        "embedded.npz`):\n  moetier simulate embedded.npz --policy lru,adaptive,belady --cache 0.25\n"
        "  moetier simulate embedded.npz --policy all --cache 8",
    )
    p.add_argument("trace", metavar="TRACE", help="trace .npz, or a raw routing .jsonl / router-trace .json")
    p.add_argument("--policy", default="adaptive",
                   help=f"one of {', '.join(policy_names())}, a comma-separated list, or 'all' (default: adaptive)")
    p.add_argument("--cache", required=True, metavar="SIZE",
                   help="per-layer expert cache: experts per layer (16), a fraction (0.25) or a percentage "
                   "(25%%) of the layer's experts, or a size (8GB, needs the model: --model or the trace's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, e.g. half_life=256 (adaptive), period=1024 (lfu-decay)")
    p.add_argument("--profile", metavar="TRACE",
                   help="static policy: routing profile trace (default: the replayed trace, in-sample)")
    p.add_argument("--warmup-repeats", type=int, default=48,
                   help="raw files: drop rows whose weight vector repeats more than this (default 48)")
    p.add_argument("--machine", metavar="M", help="predict decode tokens/s on this machine (planner roofline)")
    p.add_argument("--model", metavar="NAME", help="model for --machine (default: from the trace's provenance)")
    p.add_argument("--precision", default="bf16", help="weight precision for --machine (default bf16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise MoetierError(f"--param {it!r}: expected KEY=VALUE")
        v: Any
        try:
            v = int(val)
        except ValueError:
            try:
                v = float(val)
            except ValueError:
                v = val
        out[key.strip().replace("-", "_")] = v
    return out


def _policies(text: str) -> list[str]:
    if text.strip().lower() == "all":
        return policy_names()
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in policy_names():
            raise MoetierError(f"--policy {n!r}: unknown cache policy; valid policies: {', '.join(policy_names())}")
    return names


def trace_spec(trace_model: str | None, model: str | None, num_experts: int | None, what: str) -> Any:
    """The catalog model a trace was recorded from (``--model`` overrides the provenance)."""
    from moetier.catalog import resolve_model
    from moetier.traces.importers import catalog_name_for

    name = model or catalog_name_for(trace_model)
    if name is None:
        raise MoetierError(f"{what}: the trace's model {trace_model!r} is not in the moetier catalog; "
                           "name it with --model (see `moetier models`)")
    spec = resolve_model(name)
    if num_experts is not None and spec.num_experts != num_experts:
        raise MoetierError(f"--model {spec.name}: has {spec.num_experts} routed experts per layer but the trace "
                           f"has {num_experts}; the hit rate would not transfer")
    return spec


def predict_speed(trace_model: str | None, model: str | None, machine: str, capacity: int, hit_rate: float,
                  precision: str, num_experts: int | None = None) -> dict[str, Any]:
    """Hit rate -> predicted decode tokens/s through the planner (roofline)."""
    try:
        from moetier.planner.machines import get_machine
        from moetier.planner.roofline import predict_decode_tokens_per_s
    except ImportError as e:
        raise MoetierError(f"--machine: the planner's roofline model is not available in this build ({e})") from None
    from moetier.planner.census import census

    spec = trace_spec(trace_model, model, num_experts, "--machine")
    cen = census(spec, precision)
    cache_bytes = float(capacity * spec.num_moe_layers * cen.expert_bytes)
    mach = get_machine(machine)
    tps = predict_decode_tokens_per_s(spec, mach, hit_rate=hit_rate, cache_bytes=cache_bytes, precision=precision)
    return {"model": spec.name, "machine": machine, "precision": precision, "cache_bytes": cache_bytes,
            "tokens_per_s": float(tps)}


def run(args: argparse.Namespace) -> int:
    from moetier.traces.importers import open_trace
    from moetier.traces.simulate import parse_cache_size, simulate

    trace = open_trace(args.trace, warmup_repeats=args.warmup_repeats)
    def layer_bytes() -> float:
        from moetier.planner.census import census

        spec = trace_spec(trace.meta.get("model"), args.model, trace.num_experts, f"--cache {args.cache}")
        return spec.num_moe_layers * census(spec, args.precision).expert_bytes

    cap = parse_cache_size(args.cache, trace.num_experts, layer_bytes)
    params = _params(args.param)
    profile = open_trace(args.profile, warmup_repeats=args.warmup_repeats) if args.profile else None
    names = _policies(args.policy)
    if params and len(names) > 1:
        raise MoetierError("--param applies to one policy; give a single --policy with it")
    results = []
    for name in names:
        res = simulate(trace, name, cap, profile=profile if name == "static" else None, **params)
        obj = res.to_json()
        if args.machine:
            obj["prediction"] = predict_speed(trace.meta.get("model"), args.model, args.machine, cap,
                                              res.hit_rate, args.precision, trace.num_experts)
        results.append(obj)
    head = {"trace": str(args.trace), "model": trace.meta.get("model"), "num_experts": trace.num_experts,
            "top_k": trace.top_k, "rows": len(trace), "rows_dropped": trace.meta.get("rows_dropped", 0)}
    if args.json:
        out = {**head, **results[0]} if len(results) == 1 else {**head, "results": results}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.trace}: model {head['model']}, {head['rows']} rows ({head['rows_dropped']} dropped), "
          f"{trace.num_experts} experts, top-{trace.top_k}; cache {cap} experts per layer")
    layers = [r["layer"] for r in results[0]["per_layer"]]
    cols = [r["policy"] for r in results]
    print(f"{'layer':>8}  " + "  ".join(f"{c:>10}" for c in cols))
    if len(layers) > 1:
        for i, lyr in enumerate(layers):
            print(f"{lyr:>8}  " + "  ".join(f"{r['per_layer'][i]['hit_rate']:>10.3f}" for r in results))
    print(f"{'overall':>8}  " + "  ".join(f"{r['hit_rate']:>10.3f}" for r in results))
    for r in results:
        if "prediction" in r:
            pr = r["prediction"]
            print(f"{r['policy']}: {pr['tokens_per_s']:.2f} tokens/s predicted on {pr['machine']} "
                  f"({pr['model']}, {pr['precision']}, cache {pr['cache_bytes'] / 1e9:.2f} GB)")
    return 0
