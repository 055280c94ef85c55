"""``moetier plan MODEL --machine M``: place a model on one machine and predict tokens/s.

Thin: parses arguments and calls :mod:`moetier.planner.roofline` (the single-machine planner).
``--what-if KEY=VALUE`` re-plans with one resource changed and prints before/after with the
new binding resource. ``--devices N`` (N > 1) hands over to the cluster planner.

Cluster hook (``moetier.planner.cluster_cli``): ``add_cluster_args(parser)`` adds the cluster-only
options (skipping flags already defined here), ``wants_cluster(args)`` decides the hand-over and
``run_plan_command(args) -> int`` runs ``moetier plan ... --devices N``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moetier.catalog import resolve_model
from moetier.errors import ConfigError
from moetier.planner import cluster_cli as cluster_planner
from moetier.planner import roofline
from moetier.planner.machines import get_machine


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="place a model on a machine's memory tiers and predict decode/prefill tokens/s",
        description="Place the always-on weights in the nearest tier that holds them and the routed "
        "experts by hotness in the rest; predict decode and prefill tokens/s from the compute / "
        "memory / communication triangle and name the binding resource.",
        epilog="examples:\n  moetier plan qwen3-30b-a3b --machine h100 --precision fp8 --cache 25%\n"
        "  moetier plan mixtral-8x7b --machine cpu --precision int4 --cache 8GB --what-if cache=2x",
    )
    p.add_argument("model", metavar="MODEL", help="catalog name, config.json or model directory")
    p.add_argument("--machine", required=True,
                   help="built-in name (see `moetier machines`), 'cpu' (measured), or a .toml/.yaml file")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--context", type=int, default=roofline.DEFAULT_CONTEXT,
                   help=f"tokens in each sequence's KV cache / prompt length (default {roofline.DEFAULT_CONTEXT})")
    p.add_argument("--precision", default=None,
                   help="bf16 | fp8 | int8 | int4 | fp4 | fp32 | mixed:attention=bf16,experts=int4 | "
                   "checkpoint (the stored format: a catalog model's, or read from a local directory's files). "
                   "Default: a local checkpoint as stored, a catalog model in bf16")
    p.add_argument("--fast-mem", default=None, metavar="BYTES",
                   help="cap the fast tiers' capacity, e.g. 24GB")
    p.add_argument("--cache", default=None, metavar="SIZE",
                   help="cap the expert bytes held in the fast tiers (expert cache): a size (8GB), a fraction "
                   "(0.25) or a percentage (25%%) of the routed experts")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="expert-selection profile [moe_layers, experts] (.npy, .csv, .json) or a routing "
                   "trace (.npz/.jsonl): hot experts are placed nearest")
    p.add_argument("--what-if", action="append", default=[], metavar="KEY=VALUE",
                   help="change one resource and compare: sram=230MB, hbm_bw=2x, link_bw=100GB/s, "
                   "flops=2x, cache=10GB, host_flops=2T, batch=64 ... (repeatable)")
    p.add_argument("--no-overlap", action="store_true",
                   help="add compute, memory and communication times instead of taking the max")
    p.add_argument("--devices", type=int, default=None,
                   help="plan an N-device deployment (cluster planner); default: one machine")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    cluster_planner.add_cluster_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: expected a whole number of devices >= 1")
    args.precision = _precision(args)
    if (args.devices is not None and args.devices != 1) or cluster_planner.wants_cluster(args):
        return _cluster(args)
    from moetier.commands.census import spec_as_stored

    spec = spec_as_stored(args.model, resolve_model(args.model))
    machine = get_machine(args.machine)
    profile = roofline.load_profile(args.profile, spec) if args.profile else None
    kw = dict(batch=args.batch, context=args.context, precision=_precision(args), fast_mem=args.fast_mem,
              cache_bytes=args.cache, profile=profile, overlap=not args.no_overlap)
    if args.what_if:
        results = roofline.what_if(spec, machine, args.what_if, **kw)
        if args.json:
            print(json.dumps({"before": results[0].before.to_json(),
                              "what_if": [w.to_json() for w in results]}, indent=2))
        else:
            print(roofline.format_what_if(results))
        return 0
    result = roofline.plan(spec, machine, **kw)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(roofline.format_plan(result))
    return 0


def _precision(args: argparse.Namespace) -> Any:
    """As ``moetier census``: a local checkpoint as stored unless a precision is asked for."""
    if args.precision not in (None, "checkpoint"):
        return args.precision
    from moetier.commands.census import has_weights, resolve_precision

    if Path(args.model).suffix == ".gguf" and Path(args.model).is_file():  # the file's block types and bytes
        from moetier.weights.gguf_io import file_precision

        return file_precision(args.model, resolve_model(args.model))
    if has_weights(args.model):
        from moetier.spec import load_spec
        from moetier.weights.stored import checkpoint_precision

        return checkpoint_precision(args.model, load_spec(args.model))
    return resolve_precision(args.model, args.precision, resolve_model(args.model))[0]


def _cluster(args: argparse.Namespace) -> int:
    """Hand over to the cluster planner's command line (moetier.planner.cluster_cli)."""
    return int(cluster_planner.run_plan_command(args) or 0)
