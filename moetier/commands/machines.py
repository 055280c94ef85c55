"""``moetier machines [NAME|FILE] [--json]``: list the machine catalog, or describe one machine."""

from __future__ import annotations

import argparse
import json

from moetier.planner import machines as mc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "machines",
        help="list built-in machines (or describe one, or a machine file)",
        description="Built-in machines with their memory tiers, compute, links, efficiency factors, "
        "confidence (R read in a vendor document, U unverified, M measured) and source.",
    )
    p.add_argument("machine", nargs="?", default=None, metavar="NAME|FILE",
                   help="describe one machine (a built-in, 'cpu', or a .toml/.yaml override file)")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.machine:
        m = mc.get_machine(args.machine)
        print(json.dumps(mc.machine_to_dict(m), indent=2) if args.json else "\n".join(mc.describe(m)))
        return 0
    if args.json:
        print(json.dumps([mc.machine_to_dict(m) for m in mc.CATALOG.values()], indent=2))
        return 0
    print(f"{'name':14s} {'conf':4s} {'bf16':>11s} {'fp8':>11s} {'tiers (nearest first)'}")
    for m in mc.CATALOG.values():
        tiers = ", ".join(f"{t.name} {mc.fmt_bytes(t.capacity_bytes)} @ {mc.fmt_si(t.read_bw, 'B/s')}"
                          for t in m.tiers)

        def fl(p: str, m=m) -> str:
            try:
                return mc.fmt_si(m.flops_for(p), "FLOP/s")
            except KeyError:
                return "-"

        print(f"{m.name:14s} {m.confidence:4s} {fl('bf16'):>11s} {fl('fp8'):>11s} {tiers}")
    print(f"{'cpu':14s} {'M':4s} {'(measured by `moetier probe`)':>23s}")
    print("peak dense figures; efficiency factors: `moetier machines NAME`. Override with --machine FILE.toml "
          "(see moetier/planner/machines.py)")
    return 0
