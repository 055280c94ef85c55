"""``moetier census MODEL [--precision P] [--json]``: parameters and bytes per weight group."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from moetier import catalog
from moetier.catalog import resolve_model
from moetier.errors import ConfigError
from moetier.planner.census import ALWAYS_ON_GROUPS, Census, census
from moetier.weights.stored import StoredCensus, checkpoint_precision, stored_census


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "census",
        help="parameters and bytes per weight group (always-on vs routed, active per token)",
        description="Count a model's parameters and bytes per weight group: which are always on "
        "(read for every token) and which are routed experts, and how many are active per token.",
        epilog="examples:\n  moetier census qwen3-30b-a3b --precision int4\n  moetier census moetier/data/embedded",
    )
    p.add_argument("model", metavar="MODEL",
                   help="catalog name (see `moetier models`), config.json, model dir or .gguf file")
    p.add_argument(
        "--precision",
        default=None,
        help="bf16 | fp16 | fp32 | fp8 | int8 | int4 | int4:g32 | fp4 | nvfp4 | "
        "mixed:attention=bf16,experts=int4,... | checkpoint (the stored format: a catalog model's, or a "
        "local directory's or .gguf file's, read from its files with its real stored bytes per group). "
        "Default: a local checkpoint as stored, a catalog model in bf16",
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


STORED = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}  # safetensors dtype -> census precision
TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def stored_precision(model: str, spec: Any) -> tuple[str, str]:
    """(precision, where it was read) of a local checkpoint as stored: the dtype holding most of
    the bytes of its safetensors files, else config.json's ``torch_dtype``, else bf16 (said so)."""
    from moetier.errors import WeightError
    from moetier.weights.safetensors_io import parse_header

    p = Path(model)
    files = sorted((p if p.is_dir() else p.parent).glob("*.safetensors"))
    by_dtype: dict[str, int] = {}
    try:
        for f in files:
            for t in parse_header(f).values():
                by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    except WeightError:
        by_dtype = {}
    if by_dtype and set(by_dtype) <= set(STORED):
        top = max(by_dtype, key=lambda k: by_dtype[k])
        share = by_dtype[top] / sum(by_dtype.values())
        return STORED[top], "as stored" + ("" if share == 1 else f" ({share:.0%} of the bytes; the rest "
                                           f"{', '.join(STORED[k] for k in by_dtype if k != top)})")
    if spec.torch_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[spec.torch_dtype], "config.json torch_dtype"
    return "bf16", "assumed: neither safetensors files nor config.json torch_dtype say"


def spec_as_stored(model: str, spec: Any) -> Any:
    """``spec`` without the MTP layers its config announces when a local checkpoint's files do
    not hold them (transformers saves DeepSeek-V3 without its multi-token-prediction layer)."""
    import dataclasses

    from moetier.errors import WeightError
    from moetier.weights.safetensors_io import parse_header

    p = Path(model)
    files = sorted((p if p.is_dir() else p.parent).glob("*.safetensors")) if p.exists() else []
    if not spec.num_mtp_layers or not files:
        return spec
    first = f"model.layers.{spec.num_layers}."  # MTP layers are stored after the decoder layers
    try:
        stored = any(name.startswith(first) for f in files for name in parse_header(f))
    except WeightError:
        return spec
    return spec if stored else dataclasses.replace(spec, num_mtp_layers=0)


def resolve_precision(model: str, precision: str | None, spec: Any) -> tuple[str, str | None]:
    """The precision to count ``model`` at, and a note on where it came from (None: as asked).

    ``None``: a local checkpoint as stored, a catalog model bf16. ``checkpoint``: as stored (the
    catalog's record of the released format, or the local files)."""
    cat = _catalog_name(model)
    if precision not in (None, "checkpoint"):
        return precision, None
    if cat is not None:
        if precision is None:
            return "bf16", None
        return catalog.entry(cat).checkpoint_precision, "the released checkpoint's format (catalog)"
    if Path(model).exists():
        return stored_precision(model, spec)
    if precision is None:
        return "bf16", None
    raise ConfigError(f"--precision checkpoint: {model!r} is neither a catalog model nor a local checkpoint; "
                      "give a precision such as bf16, fp8, int4 or mixed:experts=fp4")


def has_weights(model: str) -> bool:
    """A local checkpoint directory with safetensors files (a bare config.json has no stored bytes)."""
    p = Path(model)
    return p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists())


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
    spec = spec_as_stored(args.model, resolve_model(args.model))
    cat = _catalog_name(args.model)
    stored = None
    gguf = Path(args.model).suffix == ".gguf" and Path(args.model).is_file()
    if gguf and args.precision in (None, "checkpoint"):  # the file's own block types and bytes
        from moetier.weights.gguf_io import file_census

        precision, source = "checkpoint", "as stored (GGUF block types)"
        c = file_census(args.model, spec)
    else:
        if cat is None and has_weights(args.model) and args.precision in (None, "checkpoint"):
            stored = stored_census(args.model, spec)  # the files' real bytes per group
            precision, source = checkpoint_precision(args.model, spec, stored), "as stored"
            if not stored.has_mtp:  # MTP layers in config.json but not in the files: nothing stored
                spec = replace(spec, num_mtp_layers=0)
        else:
            precision, source = resolve_precision(args.model, args.precision, spec)
        c = census(spec, precision)
    if args.json:
        d = c.to_json()
        d["precision_source"] = source or "as asked (--precision)" if args.precision else source or "default"
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
        lines = _lines(c, cat, stored)
        if source:
            lines = [ln + f" ({source})" if ln.startswith("precision: ") else ln for ln in lines]
        print("\n".join(lines))
    return 0
