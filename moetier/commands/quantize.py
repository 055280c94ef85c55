"""``moetier quantize SRC OUT --format int4|int8|fp8 [--group N] [--experts-only | --keep-head]``: write a
quantized copy of a bf16 / fp32 checkpoint in a released layout other tools read;
``moetier quantize SRC OUT.gguf --type Q8_0|Q6_K|Q5_K|Q4_K|Q5_K_M|Q4_K_M|BF16|F16|F32``:
write a GGUF file llama.cpp loads (``moetier.weights.gguf_write``; SRC a checkpoint directory
or a float GGUF).

* ``int4`` / ``int8``: compressed-tensors pack-quantized (symmetric groups of ``--group``
  values, bf16 scales; transformers and vLLM load it through the ``compressed-tensors``
  package);
* ``fp8``: FP8 e4m3 with one float32 ``weight_scale_inv`` per 128x128 block (DeepSeek-V3's
  layout, ``quant_method: "fp8"``).

Quantized: every linear weight a quantized release quantizes (attention, dense FFN, shared and
routed experts) and the LM head (int8 as the rest; int8 group 128 under int4; kept with
``--keep-head``, and always under fp8: FP8 readers keep the head plain, see
``quant/convert.py: head_format``), or only the routed experts with ``--experts-only``;
embeddings, norms and routers are copied. A tied head (``tie_word_embeddings``) is written as
its own quantized ``lm_head`` and the config unties it; the embedding stays. One source shard
at a time (memory: one shard). config.json gets the ``quantization_config``; the other files
(tokenizer, generation config, ...) are copied. moetier reads the result back (``moetier.load(OUT)``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from moetier.errors import ConfigError
from moetier.quant.convert import FORMATS, GROUPS, head_format, quantization_config, quantize_state_dict
from moetier.spec import load_spec
from moetier.weights.gguf_write import OUT_TYPES
from moetier.weights.safetensors_io import INDEX_NAME, SafetensorsIndex


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write an int4 / int8 (compressed-tensors), fp8 (block-scaled) or GGUF (llama.cpp) copy of a checkpoint",
        description="Quantize a bf16/fp32 checkpoint into a released on-disk layout: compressed-tensors "
        "pack-quantized int4/int8 or FP8 e4m3 with 128x128 block scales (--format, round to nearest), or a "
        "GGUF file llama.cpp loads (--type: llama.cpp's quantizers and per-tensor recipe).",
        epilog="example:\n  moetier quantize moetier/data/embedded emb-Q8_0.gguf --type Q8_0\n\n"
        "GGUF types (llama.cpp's quantizers: blocks identical to llama-quantize's without an imatrix):\n"
        "  Q8_0, Q6_K        llama.cpp's presets of those names\n"
        "  Q4_K, Q5_K        every quantizable tensor in that type (llama-quantize --pure; not aliases\n"
        "                    of Q4_K_M / Q5_K_M as in llama-quantize)\n"
        "  Q4_K_M, Q5_K_M    llama.cpp's mixes: output.weight, and attn_v / ffn_down in some layers, Q6_K\n"
        "  F32, F16, BF16    float (from a quantized .gguf: its dequantization)\n"
        "Norms, routers and 1-D tensors stay F32. Rows that are not whole 256-value blocks fall back as\n"
        "llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), said once per tensor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory (bf16 / fp32), or a float .gguf for --type")
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty if it exists), "
                   "or a new .gguf file for --type")
    p.add_argument("--format", choices=FORMATS, help="int4 | int8 | fp8 (safetensors layouts)")
    p.add_argument("--type", dest="gguf_type", choices=OUT_TYPES, metavar="TYPE",
                   help=f"GGUF output: {' | '.join(OUT_TYPES)}")
    p.add_argument("--group", type=int, default=None, choices=GROUPS,
                   help="int4 / int8: values per scale (default 32 for int4, 128 for int8)")
    p.add_argument("--experts-only", action="store_true", help="quantize the routed experts only")
    p.add_argument("--keep-head", action="store_true",
                   help="keep the LM head as stored (default: int8 like the rest, int8 group 128 under int4; "
                   "fp8 always keeps it)")
    p.set_defaults(func=run)


def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, group: int | None = None,
                        experts_only: bool = False, keep_head: bool = False) -> Path:
    src, out = Path(src), Path(out)
    spec = load_spec(src)
    if spec.quantization is not None:
        raise ConfigError(f"{src / 'config.json'}: the checkpoint is already quantized "
                          f"({spec.quantization.method}); quantize a bf16 / fp32 checkpoint")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    g = group if group is not None else (32 if fmt == "int4" else 128)
    if experts_only and keep_head:
        raise ConfigError("--keep-head: with --experts-only the LM head is not quantized anyway; give one of them")
    head = None if experts_only else head_format(fmt, g, keep_head, on_disk=True, cols=spec.hidden_size)
    tied = head is not None and spec.tie_word_embeddings
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: output directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    idx = SafetensorsIndex(src)
    try:
        by_file: dict[Path, list[str]] = {}
        for name, info in idx.tensors.items():
            by_file.setdefault(info.file, []).append(name)
        weight_map: dict[str, str] = {}
        ignore: set[str] = set()
        for path, names in sorted(by_file.items()):
            sd = {n: idx.read(n) for n in names}
            sd = {n: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for n, t in sd.items()}
            if tied and "model.embed_tokens.weight" in sd and "lm_head.weight" not in idx.tensors:
                # the tied head's own copy (quantized below)
                sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
            q, ign = quantize_state_dict(sd, fmt, group=g, experts_only=experts_only, head=head)
            keep_dtype = {n: idx.info(n).torch_dtype for n in names}
            # tensors copied as they were (upcast above only to quantize)
            q = {n: t.to(keep_dtype[n]) if n in keep_dtype and t.dtype == torch.float32 else t.contiguous()
                 for n, t in q.items()}
            save_file(q, out / path.name, metadata={"format": "pt"})
            weight_map.update({n: path.name for n in q})
            ignore.update(ign)
    finally:
        idx.close()
    if (src / INDEX_NAME).exists():
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                 indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX_NAME, "config.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if tied:
        if not any(n.startswith("lm_head.") for n in weight_map):
            raise ConfigError(f"{src}: tie_word_embeddings is set but no shard holds model.embed_tokens.weight")
        cfg["tie_word_embeddings"] = False
    cfg["quantization_config"] = quantization_config(fmt, g, ignore=sorted(ignore), head=head)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run_gguf(args: argparse.Namespace) -> int:
    import sys

    from moetier.commands.census import fmt_bytes
    from moetier.weights.gguf_write import write_gguf

    if args.format is not None or args.group is not None or args.experts_only or args.keep_head:
        raise ConfigError("--type (GGUF output) takes no --format / --group / --experts-only / --keep-head")
    rep = write_gguf(args.src, args.out, args.gguf_type, on_note=lambda s: print(f"note: {s}", file=sys.stderr))
    types = ", ".join(f"{n} {t}" for t, n in sorted(rep.types.items(), key=lambda kv: -kv[1]))
    print(f"wrote {rep.path} ({args.gguf_type}): {fmt_bytes(rep.nbytes)} of tensors; tensors by type: {types} "
          f"({rep.seconds:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.gguf_type is not None:
        return run_gguf(args)
    if args.format is None:
        raise ConfigError("moetier quantize: give --format int4|int8|fp8 (safetensors) or --type "
                          f"{'|'.join(OUT_TYPES)} (GGUF)")
    if str(args.out).endswith(".gguf"):
        raise ConfigError(f"{args.out}: a .gguf output needs --type (one of {', '.join(OUT_TYPES)}), not --format")
    out = quantize_checkpoint(args.src, args.out, args.format, args.group, args.experts_only, args.keep_head)
    spec = load_spec(out)
    from moetier.commands.census import fmt_bytes
    from moetier.weights.stored import stored_census

    src_bytes = sum(p.stat().st_size for p in Path(args.src).glob("*.safetensors"))
    print(f"wrote {out} ({args.format}{'' if args.format == 'fp8' else f' group {spec.quantization.int_groups[0][1]}'}"
          f"): {fmt_bytes(stored_census(out, spec).total)} of weights (source files {fmt_bytes(src_bytes)})")
    return 0
