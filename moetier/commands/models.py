"""``moetier models [--json]``: the built-in model catalog with published and counted sizes."""

from __future__ import annotations

import argparse
import json

from moetier import catalog
from moetier.commands.census import fmt_params
from moetier.planner.census import census


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the built-in model catalog (usable as MODEL in census / plan)",
        description="List the built-in catalog: architecture, published total/active parameters "
        "(and the publisher's counting convention) beside moetier's own count.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


def _row(name: str) -> dict:
    e = catalog.entry(name)
    spec = catalog.get(name)
    c = census(spec)
    pub = e.published
    return {
        "name": name,
        "hf_repo": e.hf_repo,
        "family": spec.family,
        "layers": spec.num_layers,
        "experts": spec.num_experts,
        "top_k": spec.top_k,
        "checkpoint_precision": e.checkpoint_precision,
        "total_params": c.total_params,
        "active_params": c.active_params,
        "active_params_excluding_embedding": c.active_params_excluding_embedding,
        "published_total_params": pub.total_params,
        "published_active_params": pub.active_params,
        "published_convention": pub.convention,
        "published_source": pub.source,
    }


def run(args: argparse.Namespace) -> int:
    rows = [_row(n) for n in catalog.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = (
        f"{'name':<18} {'family':<12} {'layers':>6} {'experts':>9} {'total':>8} {'active':>8} "
        f"{'published':>15}  {'hf repo'}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        experts = f"{r['top_k']}/{r['experts']}" if r["experts"] else "dense"
        # compare the published active figure with the count that follows the same convention
        lm_only = r["published_convention"] == "lm_head_only"
        active = r["active_params_excluding_embedding" if lm_only else "active_params"]
        pub = f"{fmt_params(r['published_total_params'])}/{fmt_params(r['published_active_params'])}"
        if lm_only:
            pub += "*"
        print(
            f"{r['name']:<18} {r['family']:<12} {r['layers']:>6} {experts:>9} "
            f"{fmt_params(r['total_params']):>8} {fmt_params(active):>8} {pub:>15}  {r['hf_repo']}"
        )
    print(
        "\nactive = incl. embedding table and LM head; * = publisher counts the LM head but not the "
        "embedding lookup (active shown the same way). Details: moetier census NAME"
    )
    return 0
