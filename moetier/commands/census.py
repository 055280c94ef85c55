"""``moetier census MODEL [--precision P] [--json]``: parameters and bytes per weight group."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from moetier import catalog
from moetier.errors import ConfigError
from moetier.planner.census import ALWAYS_ON_GROUPS, Census, census
from moetier.spec import resolve_model
from moetier.weights.stored import StoredCensus, checkpoint_precision, stored_census


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "census",
        help="parameters and bytes per weight group (always-on vs routed, active per token)",
        description="Count a model's parameters and bytes per weight group: which are always on "
        "(read for every token) and which are routed experts, and how many are active per token.",
    )
    p.add_argument("model", metavar="MODEL", help="catalog name (see `moetier models`), config.json or model dir")
    p.add_argument(
        "--precision",
        default=None,
        help="default: bf16, or 'checkpoint' for a quantized local checkpoint; "
        "bf16 | fp16 | fp32 | fp8 | int8 | int4 | int4:g32 | fp4 | nvfp4 | "
        "mixed:attention=bf16,experts=int4,... | checkpoint (the stored format: a catalog model's, or a "
        "local directory's read from its files, with its real stored bytes per group)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def fmt_params(n: float) -> str:
    """Parameter count for display: 671.03B, 926.7M, 1.03T."""
    a = abs(n)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if a >= div:
            v = n / div
            return f"{v:.2f}{unit}" if v < 100 else f"{v:.1f}{unit}"
    return f"{int(n)}"


def fmt_bytes(b: float) -> str:
    """Bytes for display in decimal units (GB = 1e9 bytes)."""
    a = abs(b)
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if a >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _catalog_name(model: str) -> str | None:
    if Path(model).exists():
        return None
    return model if model in catalog.names() else None


def _lines(c: Census, cat: str | None, stored: StoredCensus | None = None) -> list[str]:
    s = c.spec
    out: list[str] = []
    shape = f"{s.family}, {s.num_layers} layers"
    if s.is_moe:
        shape += (
            f", {s.num_moe_layers} MoE layers x {s.num_experts} routed experts (top-{s.top_k})"
            f", {s.num_shared_experts} shared"
        )
    if s.num_mtp_layers:
        shape += f", {s.num_mtp_layers} MTP layer(s)"
    out.append(f"{s.name}: {shape}")
    out.append(f"precision: {c.precision.name}")
    out.append("")
    header = f"{'group':<16} {'params':>10} {'bytes':>11}  {'format':<11} {'kind':<14} {'active/token':>12}"
    if stored is not None:
        header += f" {'stored (files)':>14}"
    out.append(header)
    out.append("-" * len(header))
    for g in c.groups.values():
        if g.params == 0:
            continue
        if g.name == "mtp":
            continue
        kind = "always-on" if g.always_on else "routed"
        line = (f"{g.name:<16} {fmt_params(g.params):>10} {fmt_bytes(g.bytes):>11}  "
                f"{c.precision.format_of(g.name):<11} {kind:<14} {fmt_params(g.active_params):>12}")
        if stored is not None:
            line += f" {fmt_bytes(stored.bytes.get(g.name, 0)):>14}"
        out.append(line)
    out.append("-" * len(header))
    total = f"{'total':<16} {fmt_params(c.total_params):>10} {fmt_bytes(c.total_bytes):>11}"
    if stored is not None:
        total += " " * (len(header) - 15 - len(total)) + f"{fmt_bytes(stored.total):>14}"
    out.append(total)
    mtp = c.groups["mtp"]
    if mtp.params:
        out.append(
            f"{'mtp (apart)':<16} {fmt_params(mtp.params):>10} {fmt_bytes(mtp.bytes):>11}  "
            f"{'':<11} {'not in total':<14} {'0':>12}"
        )
        out.append(
            f"  with MTP: {fmt_params(c.total_params_with_mtp)}; as stored in the checkpoint "
            f"(MTP layers keep copies of embedding + LM head): {fmt_params(c.checkpoint_params)}"
        )
    out.append("")

    pub = catalog.published(cat) if cat else None
    incl = f"{'active params (incl. embedding + LM head):':<50} {fmt_params(c.active_params):>9}"
    excl = f"{'active params (excl. embedding lookup):':<50} {fmt_params(c.active_params_excluding_embedding):>9}"
    if pub is not None:
        note = f"   published {fmt_params(pub.active_params)} ({pub.convention_text})"
        if pub.convention == "lm_head_only":
            excl += note
        else:
            incl += note
    out.append(incl)
    out.append(excl)
    if pub is not None:
        out.append(
            f"{'total params:':<50} {fmt_params(c.total_params):>9}   published {fmt_params(pub.total_params)}"
        )
        out.append(f"  published figures: {pub.source}")
    out.append("")
    out.append(
        f"{'always-on, complete set:':<50} {fmt_params(c.always_on_params):>9}  {fmt_bytes(c.always_on_bytes)}"
    )
    out.append(f"  = {' + '.join(g for g in ALWAYS_ON_GROUPS if c.groups[g].params)}")
    ffn_bytes = c.groups["dense_ffn"].bytes + c.groups["shared_experts"].bytes
    out.append(
        f"{'always-on, FFN-only hot set:':<50} {fmt_params(c.always_on_ffn_params):>9}  {fmt_bytes(ffn_bytes)}"
    )
    out.append("  = dense_ffn + shared_experts (no attention, norms, routers, embedding, LM head)")
    if s.is_moe:
        out.append(
            f"{'routed experts:':<50} {fmt_params(c.routed_params):>9}  {fmt_bytes(c.routed_bytes)}"
        )
        out.append(
            f"{'one routed expert:':<50} {fmt_params(c.expert_params):>9}  {fmt_bytes(c.expert_bytes)}"
        )
    out.append(f"{'bytes read per decoded token (batch 1):':<50} {fmt_bytes(c.active_bytes):>9}")
    return out


def run(args: argparse.Namespace) -> int:
    spec = resolve_model(args.model)
    cat = _catalog_name(args.model)
    precision = args.precision
    if precision is None:  # a quantized local checkpoint is counted in its stored format
        precision = "checkpoint" if cat is None and Path(args.model).is_dir() and spec.quantization else "bf16"
    stored = None
    if precision == "checkpoint" and cat is None and Path(args.model).is_dir():
        stored = stored_census(args.model, spec)
        precision = checkpoint_precision(args.model, spec, stored)
        if not stored.has_mtp:  # MTP layers in config.json but not in the files: nothing stored
            spec = replace(spec, num_mtp_layers=0)
    elif precision == "checkpoint":
        if cat is None:
            raise ConfigError(
                f"--precision checkpoint: {args.model!r} is not a catalog model or a model directory; give a precision "
                "such as bf16, fp8, int4 or mixed:experts=fp4"
            )
        precision = catalog.entry(cat).checkpoint_precision
    c = census(spec, precision)
    if args.json:
        d = c.to_json()
        if cat is not None:
            pub = catalog.published(cat)
            d["published"] = {
                "total_params": pub.total_params,
                "active_params": pub.active_params,
                "convention": pub.convention,
                "compare_with": pub.census_field,
                "source": pub.source,
            }
        if stored is not None:
            d["stored_bytes"] = {g: stored.bytes.get(g, 0) for g in c.groups}
            d["stored_total_bytes"] = stored.total
        print(json.dumps(d, indent=2))
    else:
        print("\n".join(_lines(c, cat, stored)))
    return 0
