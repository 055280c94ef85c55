"""Write a GGUF file llama.cpp loads (``moetier quantize SRC OUT.gguf --type T``).

Source: an HF checkpoint directory (safetensors, bf16 / fp16 / fp32) of a supported family
(``qwen3_moe``, ``qwen2_moe``, ``mixtral``, ``olmoe``, dense ``llama``), or a float GGUF
(F32 / F16 / BF16, e.g. the output of llama.cpp's ``convert_hf_to_gguf.py``), whose metadata
is copied as it is. A quantized GGUF is refused, except with a float output type
(``--type F32`` writes its dequantization: the float reference of a quantized file).

From a checkpoint the file is what llama.cpp's converter writes: tensor names from
:func:`moetier.weights.gguf_io.gguf_tensor_name` (the inverse of the reader's mapping: one
table), routed experts merged into ``blk.N.ffn_{gate,up,down}_exps`` ``[E, rows, cols]``, the
llama-arch q/k rows permuted for ggml's rope (the inverse of the reader's
:func:`~moetier.weights.gguf_io.unpermute_rows`), the ``{arch}.*`` hyper-parameters, the
tokenizer (``tokenizer.ggml.*``: the vocabulary from ``tokenizer.json`` (byte-level BPE) or
``tokenizer.model`` (SentencePiece), merges, special token ids and the chat template through
gguf-py's ``SpecialVocab``, as the converter does). ``--type BF16`` on the test checkpoints
gives the converter's tensors byte for byte (tests/quant/test_gguf_write.py).

Types per tensor: :func:`moetier.quant.ggml_quantize.tensor_type` (llama.cpp's rules: norms,
routers and 1-D tensors stay F32; Q4_K_M / Q5_K_M mixes; the fallback for rows that are not
whole 256-value blocks, said once per tensor through ``on_note``). The file is written in one
pass, one tensor in memory at a time (merged experts: one layer's), to a temporary name
renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetier.errors import ConfigError, WeightError
from moetier.quant.ggml_quantize import FILE_TYPES, FLOAT_TYPES, RECIPES, TYPE_IDS, quantizable, quantize, tensor_type
from moetier.weights.gguf_io import gguf_tensor_name, import_gguf, unpermute_rows

OUT_TYPES = (*RECIPES, *FLOAT_TYPES)
HF_ARCHS = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "llama": "llama", "olmoe": "olmoe"}


@dataclass
class Planned:
    """One output tensor: GGUF name, logical shape (rows-first), output type, and how to get
    its float32 values (or, ``raw``, bytes to copy as they are)."""

    name: str
    shape: tuple[int, ...]
    type: str
    fetch: Callable[[], np.ndarray]
    raw: bool = False


@dataclass
class WriteReport:
    path: Path
    recipe: str
    types: Counter = field(default_factory=Counter)  # ggml type -> tensors
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _layer(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m[1]) if m else -1


def _order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (``weight_name_comparer``): by layer, then by name."""
    return _layer(name), name


def _encode(values: np.ndarray, t: str) -> np.ndarray:
    """float32 ``[..., cols]`` -> stored bytes uint8 ``[..., row_bytes]`` of type ``t``."""
    gguf = import_gguf()
    lead, cols = values.shape[:-1], values.shape[-1]
    rows = values.reshape(-1, cols)
    if t == "F32":
        b = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)
    elif t == "F16":
        b = rows.astype(np.float16).view(np.uint8)
    elif t == "BF16":
        b = gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType.BF16)
        b = b.view(np.uint8).reshape(rows.shape[0], -1)
    else:
        b = quantize(rows, t)
    return b.reshape(*lead, b.shape[-1])


# ----------------------------------------------------------------------------- HF checkpoint source


def _hf_metadata(w: Any, spec: Any, arch: str, name: str) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes, from the :class:`~moetier.spec.ModelSpec`."""
    rs = dict(spec.rope_scaling or {})
    if rs.get("rope_type", rs.get("type", "default")) not in ("default", None):
        raise ConfigError(f"config.json: rope scaling {rs} is not written to GGUF by moetier yet "
                          "(convert with llama.cpp's convert_hf_to_gguf.py, then quantize that file)")
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_rope_freq_base(float(spec.rope_theta))
    w.add_layer_norm_rms_eps(float(spec.rms_norm_eps))
    if spec.num_experts:
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.top_k)
    if arch == "qwen3moe":
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if arch in ("qwen3moe", "qwen2moe") and spec.num_experts:
        w.add_expert_feed_forward_length(spec.expert_intermediate_size)
    if arch == "qwen2moe" and spec.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(spec.shared_expert_intermediate_size)
    if arch == "llama":
        w.add_vocab_size(spec.vocab_size)
        w.add_rope_dimension_count(spec.head_dim)
    if spec.sliding_window:
        w.add_sliding_window(int(spec.sliding_window))


def _pre_tokenizer(tj: dict) -> tuple[str, str | None]:
    """``tokenizer.ggml.pre`` for a tokenizer.json: the name whose split regexes
    (moetier.gguf_tokenizer.PRE_SPLITS, the reader's table) the pre-tokenizer uses."""
    from moetier.gguf_tokenizer import PRE_SPLITS

    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2", None
    if pre.get("type") == "Sequence":
        splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        for name, regexes in PRE_SPLITS.items():
            if regexes is not None and regexes == splits:
                return name, None
    return "default", ("tokenizer.json: pre-tokenizer not recognised; written as tokenizer.ggml.pre 'default' "
                       "(GPT-2's split): token ids may differ from the HF tokenizer's")


def _hf_tokenizer(w: Any, src: Path, spec: Any, arch: str, note: Callable[[str], None]) -> None:
    gguf = import_gguf()
    n_vocab = spec.vocab_size
    if (src / "tokenizer.model").exists() and arch == "llama":
        try:
            import sentencepiece as spm
        except ModuleNotFoundError:
            raise ConfigError(f"{src / 'tokenizer.model'}: writing a SentencePiece vocabulary needs the "
                              "sentencepiece package (pip install sentencepiece)") from None
        sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
        n = max(n_vocab, sp.vocab_size())
        tokens, scores, types = [], [], []
        for i in range(n):
            if i >= sp.vocab_size():
                tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
                continue
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                         else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                         else gguf.TokenType.NORMAL)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        return
    tj_path = src / "tokenizer.json"
    if not tj_path.exists():
        raise ConfigError(f"{src}: no tokenizer.json (or tokenizer.model) to write the GGUF vocabulary from")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise ConfigError(f"{tj_path}: tokenizer model {(tj.get('model') or {}).get('type')!r} is not supported "
                          "(supported: byte-level BPE, SentencePiece tokenizer.model)")
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    n = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or (t.startswith("<|") and t.endswith("|>"))
            tokens.append(t), types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t), types.append(gguf.TokenType.NORMAL)
    pre, why = _pre_tokenizer(tj)
    if why:
        note(why)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _hf_plan(src: Path, spec: Any, arch: str) -> tuple[list[tuple[str, tuple[int, ...], Callable]], Any]:
    """(GGUF name, shape, fetch float32) for every tensor of the checkpoint, experts merged."""
    from moetier.weights.safetensors_io import SafetensorsIndex

    idx = SafetensorsIndex(src)
    n_layers, n_head, n_kv, n_exp = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.num_experts
    plain: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    for hf in idx.names():
        m = re.match(r"^model\.layers\.(\d+)\.", hf)
        if m and int(m[1]) >= n_layers:  # MTP layers: not part of the GGUF model
            continue
        g = gguf_tensor_name(hf)
        if g is None:
            continue
        gname, expert = g
        if expert is None:
            plain[gname] = hf
        else:
            experts.setdefault(gname, {})[expert] = hf

    def read(hf: str) -> np.ndarray:
        t = idx.read(hf)
        if not t.is_floating_point():
            raise WeightError(f"{src}: tensor '{hf}' is {t.dtype}, expected a float checkpoint (bf16 / fp16 / fp32)")
        return t.float().numpy()

    def permuted(hf: str, heads: int) -> Callable[[], np.ndarray]:
        def f() -> np.ndarray:  # the converter's llama q/k row order: the inverse of unpermute_rows
            a = read(hf)
            return a[torch.argsort(unpermute_rows(a.shape[0], heads)).numpy()]
        return f

    out: list[tuple[str, tuple[int, ...], Callable]] = []
    for gname, hf in plain.items():
        shape = tuple(idx.info(hf).shape)
        fetch: Callable[[], np.ndarray] = lambda hf=hf: read(hf)  # noqa: E731
        if arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", gname):
            fetch = permuted(hf, n_head if ".attn_q." in gname else n_kv)
        out.append((gname, shape, fetch))
    for gname, by_e in experts.items():
        missing = sorted(set(range(n_exp)) - set(by_e))
        if missing or len(by_e) != n_exp:
            raise WeightError(f"{src}: {gname} needs experts 0..{n_exp - 1}; missing {missing[:8]}")
        shape = (n_exp, *idx.info(by_e[0]).shape)
        out.append((gname, shape, lambda by_e=by_e: np.stack([read(by_e[e]) for e in range(n_exp)])))
    return out, idx


# ----------------------------------------------------------------------------- GGUF source


def _copy_metadata(w: Any, reader: Any) -> None:
    gguf = import_gguf()
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)


def _gguf_plan(reader: Any, src: Path, recipe: str) -> list[tuple[str, tuple[int, ...], Callable, str]]:
    """(name, shape, fetch float32, stored type) per tensor of a GGUF source. Block-typed tensors
    are accepted for a float output (``--type F32``: dequantize), not to be quantized again."""
    gguf = import_gguf()
    out = []
    for t in reader.tensors:
        tname = t.tensor_type.name
        if tname not in FLOAT_TYPES and recipe not in FLOAT_TYPES:
            raise WeightError(f"{src}: tensor '{t.name}' is {tname}; moetier quantize reads float GGUF files "
                              "(F32 / F16 / BF16), not already-quantized ones (--type F32 dequantizes one)")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))

        def fetch(t: Any = t, shape: tuple[int, ...] = shape) -> np.ndarray:
            a = np.asarray(t.data)
            if t.tensor_type.name == "BF16":
                return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
            if t.tensor_type.name not in FLOAT_TYPES:
                return gguf.quants.dequantize(a, t.tensor_type).astype(np.float32).reshape(shape)
            return a.astype(np.float32).reshape(shape)

        out.append((t.name, shape, fetch, tname))
    return out


# ----------------------------------------------------------------------------- the writer


def write_gguf(src: str | Path, out: str | Path, recipe: str,
               on_note: Callable[[str], None] | None = None) -> WriteReport:
    """Write ``out`` (a new .gguf) from ``src`` (checkpoint directory or float .gguf) with the
    tensor types of ``recipe`` (:data:`OUT_TYPES`)."""
    gguf = import_gguf()
    src, out = Path(src), Path(out)
    if recipe not in OUT_TYPES:
        raise ConfigError(f"--type {recipe!r}: expected one of {', '.join(OUT_TYPES)}")
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: a GGUF output file name must end in .gguf")
    if out.exists():
        raise ConfigError(f"{out}: output file exists (remove it or choose another name)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such directory for the output file")
    t0 = time.perf_counter()
    rep = WriteReport(out, recipe)
    notes = rep.notes

    def note(s: str) -> None:
        notes.append(s)
        if on_note:
            on_note(s)
    idx = reader = None
    if src.is_file() and src.suffix == ".gguf":
        try:
            reader = gguf.GGUFReader(src)
        except Exception as e:
            raise WeightError(f"{src}: not a valid GGUF file ({e})") from None
        arch = str(reader.fields["general.architecture"].contents())
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.")
                and k.split(".", 1)[1] in ("block_count", "expert_count")}
        n_layers, n_exp = int(meta.get(f"{arch}.block_count", 0)), int(meta.get(f"{arch}.expert_count", 0) or 0)
        plan4 = _gguf_plan(reader, src, recipe)
        items = [(n, s, f) for n, s, f, _ in plan4]
        keep_as = {n: ty for n, _, _, ty in plan4}
    elif src.is_dir():
        from moetier.spec import load_spec

        spec = load_spec(src)
        cfg_path = src / "config.json"
        if spec.quantization is not None:
            raise ConfigError(f"{cfg_path}: the checkpoint is already quantized ({spec.quantization.method}); "
                              "quantize a bf16 / fp32 checkpoint")
        arch = HF_ARCHS.get(spec.family, "")
        if not arch:
            raise ConfigError(f"{cfg_path}: model_type {spec.model_type!r} cannot be written to GGUF by moetier "
                              f"(supported: {', '.join(HF_ARCHS)})")
        n_layers, n_exp = spec.num_layers, spec.num_experts
        items, idx = _hf_plan(src, spec, arch)
        keep_as = {}
    else:
        raise ConfigError(f"{src}: no such checkpoint directory or .gguf file")

    tied = "output.weight" not in {n for n, _, _ in items}
    planned: list[Planned] = []
    for name, shape, fetch in sorted(items, key=lambda it: _order(it[0])):
        if recipe in FLOAT_TYPES:
            t, fb = (recipe if quantizable(name, shape) else "keep"), None
        else:
            t, fb = tensor_type(name, shape, recipe, n_layers=n_layers, n_experts=n_exp, tied=tied)
        raw = False
        if t == "keep":
            t, raw = keep_as.get(name, "F32"), name in keep_as
            if t not in FLOAT_TYPES:  # a block-typed tensor llama-quantize would not quantize: dequantize it
                t, raw = "F32", False
        if fb:
            note(fb)
        planned.append(Planned(name, shape, t, fetch, raw))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        if reader is not None:
            _copy_metadata(w, reader)
        else:
            _hf_metadata(w, spec, arch, src.name)
            _hf_tokenizer(w, src, spec, arch, note)
        w.add_file_type(FILE_TYPES[recipe])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gqt = gguf.GGMLQuantizationType
        for p in planned:
            bs, ts = gguf.GGML_QUANT_SIZES[gqt[p.type]]
            byte_shape = (*p.shape[:-1], p.shape[-1] // bs * ts)
            w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=gqt[p.type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in planned:
            if p.raw:
                a = np.asarray(next(t for t in reader.tensors if t.name == p.name).data)
                data = np.ascontiguousarray(a).view(np.uint8)
            else:
                data = _encode(p.fetch(), p.type)
            w.write_tensor_data(np.ascontiguousarray(data))
            rep.types[p.type] += 1
            rep.nbytes += data.nbytes
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if idx is not None:
            idx.close()
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = ["OUT_TYPES", "TYPE_IDS", "WriteReport", "write_gguf"]
