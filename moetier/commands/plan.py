"""``moetier plan MODEL --machine M``: place a model on one machine and predict tokens/s.

Thin: parses arguments and calls :mod:`moetier.planner.roofline` (the single-machine planner).
``--what-if KEY=VALUE`` re-plans with one resource changed and prints before/after with the
new binding resource. ``--devices N`` (N > 1) hands over to the cluster planner.

Cluster hook (``moetier.planner.cluster``): ``add_cluster_args(parser)`` adds the cluster-only
options (skipping flags already defined here), ``wants_cluster(args)`` decides the hand-over and
``run_plan_command(args) -> int`` runs ``moetier plan ... --devices N``.
"""

from __future__ import annotations

import argparse
import json
import sys

from moetier.errors import ConfigError
from moetier.planner import cluster as cluster_planner
from moetier.planner import roofline
from moetier.planner.machines import get_machine
from moetier.spec import resolve_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="place a model on a machine's memory tiers and predict decode/prefill tokens/s",
        description="Place the always-on weights in the nearest tier that holds them and the routed "
        "experts by hotness in the rest; predict decode and prefill tokens/s from the compute / "
        "memory / communication triangle and name the binding resource.",
    )
    p.add_argument("model", metavar="MODEL", help="catalog name, config.json or model directory")
    p.add_argument("--machine", required=True,
                   help="built-in name (see `moetier machines`), 'cpu' (measured), or a .toml/.yaml file")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--context", type=int, default=roofline.DEFAULT_CONTEXT,
                   help=f"tokens in each sequence's KV cache / prompt length (default {roofline.DEFAULT_CONTEXT})")
    p.add_argument("--precision", default=None,
                   help="default: bf16, or the stored format for a quantized local checkpoint; "
                   "bf16 | fp8 | int8 | int4 | fp4 | fp32 | mixed:attention=bf16,experts=int4 | "
                   "checkpoint (the stored format: a catalog model's, or read from a local directory's files)")
    p.add_argument("--fast-mem", default=None, metavar="BYTES",
                   help="cap the fast tiers' capacity, e.g. 24GB")
    p.add_argument("--cache", default=None, metavar="BYTES",
                   help="cap the expert bytes held in the fast tiers (expert cache size)")
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
    args.precision = _precision(args)
    if (args.devices is not None and args.devices != 1) or cluster_planner.wants_cluster(args):
        return _cluster(args)
    spec = resolve_model(args.model)
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


def _precision(args: argparse.Namespace) -> str:
    if args.precision is None:  # a quantized local checkpoint plans at its stored format
        args.precision = "checkpoint" if _quantized_dir(args.model) else "bf16"
    if args.precision != "checkpoint":
        return args.precision
    from pathlib import Path

    from moetier import catalog

    if Path(args.model).is_dir():
        from moetier.spec import load_spec
        from moetier.weights.stored import checkpoint_precision

        return checkpoint_precision(args.model, load_spec(args.model))
    if Path(args.model).exists() or args.model not in catalog.names():
        raise ConfigError(f"--precision checkpoint: {args.model!r} is not a catalog model or a model directory; "
                          "give a precision such as bf16, fp8, int4 or mixed:experts=fp4")
    return catalog.entry(args.model).checkpoint_precision


def _quantized_dir(model: str) -> bool:
    from pathlib import Path

    if not Path(model).is_dir():
        return False
    from moetier.spec import load_spec

    return load_spec(model).quantization is not None


def _cluster(args: argparse.Namespace) -> int:
    """Hand over to the cluster planner (moetier.planner.cluster) when it provides a CLI hook."""
    from moetier.planner import cluster

    hook = getattr(cluster, "run_plan_command", None)
    if hook is None:
        print("moetier: error: --devices: the cluster planner has no CLI hook yet "
              "(moetier.planner.cluster.run_plan_command)", file=sys.stderr)
        return 2
    return int(hook(args) or 0)
