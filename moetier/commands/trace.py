"""``moetier trace``: record, import and summarise routing traces.

* ``moetier trace [MODEL_DIR] --prompts FILE --out TRACE.npz [--max-tokens N]`` records the
  routing of a moetier model (default: the embedded model) through its router observer;
* ``moetier trace import FILE --out TRACE.npz`` converts a third-party trace (routing
  .jsonl, router-trace .json) and reports the warm-up rows it dropped;
* ``moetier trace stats TRACE [--plot DIR] [--json]`` prints hotness statistics (TRACE may
  be a raw third-party file) and optionally writes PNG plots.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from moetier.errors import MoetierError

_USAGE = (
    "moetier trace [MODEL_DIR] --prompts FILE --out TRACE [--max-tokens N]\n"
    "       moetier trace import FILE --out TRACE [--warmup-repeats N]\n"
    "       moetier trace stats TRACE [--plot DIR] [--json]"
)


_DESCRIPTION = """\
record   moetier trace [MODEL_DIR] --prompts FILE --out TRACE.npz
         generates each prompt (greedy) and records the routing of every token in every
         MoE layer (default model: the embedded one)
import   moetier trace import FILE --out TRACE.npz
         converts a third-party trace (routing .jsonl, router-trace .json), dropping
         and counting engine warm-up rows
stats    moetier trace stats TRACE [--plot DIR] [--json]
         hotness statistics of a trace (.npz or a raw third-party file), PNG plots"""

_EXAMPLES = """\
examples (from a clone of the repository):
  moetier trace --prompts examples/prompts.txt --out embedded.npz --max-tokens 16
  moetier trace stats embedded.npz"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "trace",
        help="record / import routing traces and print their hotness statistics",
        description=_DESCRIPTION,
        usage=_USAGE,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="*", metavar="MODEL_DIR | import FILE | stats TRACE",
                   help="what to do: record from MODEL_DIR (default: the embedded model), import a "
                   "third-party FILE, or print the statistics of a TRACE")
    p.add_argument("--prompts", metavar="FILE", help="record: prompts, one per line (or JSON lines)")
    p.add_argument("--out", metavar="TRACE", help="record / import: output trace .npz")
    p.add_argument("--max-tokens", type=int, default=32, help="record: tokens generated per prompt (default 32)")
    p.add_argument("--prompt-set", help="record: name of the prompt set for the provenance")
    p.add_argument("--warmup-repeats", type=int, default=48,
                   help="import/stats: drop rows whose weight vector repeats more than this (default 48)")
    p.add_argument("--plot", metavar="DIR", help="stats: write PNG plots into DIR")
    p.add_argument("--json", action="store_true", help="stats: print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] == "import":
        if len(words) != 2:
            raise MoetierError("trace import: expected exactly one FILE (moetier trace import FILE --out TRACE)")
        return _import(words[1], args)
    if words and words[0] == "stats":
        if len(words) != 2:
            raise MoetierError("trace stats: expected exactly one TRACE (moetier trace stats TRACE)")
        return _stats(words[1], args)
    if len(words) > 1:
        raise MoetierError(f"trace: unexpected arguments {words[1:]} (see moetier trace --help)")
    return _record(words[0] if words else None, args)


def _import(path: str, args: argparse.Namespace) -> int:
    from moetier.traces.format import save_trace
    from moetier.traces.importers import import_file

    if not args.out:
        raise MoetierError("trace import: --out TRACE.npz is required")
    res = import_file(path, warmup_repeats=args.warmup_repeats)
    out = save_trace(res.trace, args.out)
    t = res.trace
    print(f"{path}: {res.rows_read} rows read, {res.rows_dropped} warm-up rows dropped, {len(t)} rows kept "
          f"({t.model}, {t.num_experts} experts, top-{t.top_k}, layers {t.layers}) -> {out}")
    return 0


def _fmt_stats(s: dict[str, Any]) -> list[str]:
    out = [
        f"model {s['model']}: {s['rows']} rows ({s['rows_dropped']} dropped), {s['num_experts']} experts, "
        f"top-{s['top_k']}, layers {s['layers']}",
        "",
        f"{'layer':>6} {'imbal':>6} {'unused':>6} {'top10%':>7} {'top25%':>7} {'top50%':>7} {'zipf s':>7} "
        f"{'R^2':>5} {'reuse':>6} {'rd p50':>6} {'rd p90':>6}",
    ]
    for p in s["per_layer"]:
        c, rd = p["coverage"], p["reuse_distance"]
        out.append(
            f"{p['layer']:>6} {p['imbalance_max_over_mean']:>6.2f} {p['unused_experts']:>6} {c['top10%']:>7.3f} "
            f"{c['top25%']:>7.3f} {c['top50%']:>7.3f} {p['zipf']['exponent']:>7.3f} {p['zipf']['r2']:>5.2f} "
            f"{p['previous_token_reuse']:>6.3f} {rd.get('p50', 0):>6.0f} {rd.get('p90', 0):>6.0f}"
        )
    out.append("")
    out.append("imbal = max/mean expert load; topX% = share of selections on the top X% experts; reuse = share "
               "of a row's experts also used by the previous row of the same request; rd = LRU reuse distance")
    for c in s["cross_layer"]:
        out.append(f"layer {c['from_layer']} -> {c['to_layer']}: co-selection predicts {c['predicted_overlap']:.3f} "
                   f"of next-layer experts (most-popular baseline {c['popular_overlap']:.3f})")
    for lyr, a in s.get("prefetch", {}).items():
        out.append(f"layer {lyr}: prefetch recall {a['recall']:.3f}, precision {a['precision']:.3f} "
                   f"({a['rows']} rows with a prediction)")
    for n in s["notes"]:
        out.append(f"note: {n}")
    return out


def _stats(path: str, args: argparse.Namespace) -> int:
    from moetier.traces.importers import open_trace
    from moetier.traces.stats import trace_stats

    t = open_trace(path, warmup_repeats=args.warmup_repeats)
    s = trace_stats(t)
    if args.plot:
        from moetier.traces.plots import write_plots

        s["plots"] = [str(p) for p in write_plots(t, args.plot)]
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print("\n".join(_fmt_stats(s)))
        for p in s.get("plots", []):
            print(f"wrote {p}")
    return 0


def _record(model_dir: str | None, args: argparse.Namespace) -> int:
    from moetier.traces.format import save_trace
    from moetier.traces.record import read_prompts, record_trace

    if not args.prompts or not args.out:
        raise MoetierError("trace: recording needs --prompts FILE and --out TRACE (see moetier trace --help)")
    if args.max_tokens < 1:
        raise MoetierError(f"--max-tokens {args.max_tokens}: expected a whole number >= 1")
    if model_dir is not None:
        from pathlib import Path

        if not Path(model_dir).is_dir():
            raise MoetierError(f"MODEL_DIR {model_dir}: not a directory (expected a checkpoint directory; "
                               "see moetier trace --help)")
    prompts = read_prompts(args.prompts)
    try:
        import moetier
        load = moetier.load
    except AttributeError:
        raise MoetierError("trace: this build has no runtime (moetier.load) to record from") from None
    model = load(model_dir)
    trace = record_trace(model, prompts, max_tokens=args.max_tokens, prompt_set=args.prompt_set)
    trace.meta["source_file"] = str(args.prompts)
    out = save_trace(trace, args.out)
    print(f"recorded {len(trace)} token-layer rows from {len(prompts)} prompts "
          f"({trace.model}, layers {trace.layers[:3]}{'...' if len(trace.layers) > 3 else ''}) -> {out}")
    return 0
