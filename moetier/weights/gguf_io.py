"""GGUF files (llama.cpp's model format) as a moetier checkpoint: metadata, spec, tensors.

``GGUFIndex(path)`` reads the header of ``MODEL.gguf`` (or every part of a split
``MODEL-00001-of-0000N.gguf``) with the ``gguf`` package (llama.cpp's gguf-py; the
``moetier[gguf]`` extra): its key/value metadata and tensor table. The package memory-maps the
file to parse the header; the mapping is dropped once the table is read. Tensor bytes are then
read like :class:`~moetier.weights.safetensors_io.SafetensorsIndex` does: one ``os.preadv``
into a preallocated tensor, nothing of the model mapped for compute.

Names. The index answers for our HF-style names (``model.layers.3.self_attn.q_proj.weight``),
mapped from GGUF's (``blk.3.attn_q.weight``) by :data:`BLOCK_NAMES`. A merged expert tensor
``blk.N.ffn_{gate,up,down}_exps.weight`` (GGUF shape ``[E, rows, cols]`` rows-first) is
``model.layers.N.mlp.experts.{gate,up,down}_proj``: expert ``e``'s rows are the contiguous
byte range ``[e * rows * row_bytes, (e + 1) * rows * row_bytes)``, read by :meth:`read_rows_q`.
Older Mixtral GGUFs with per-expert ``blk.N.ffn_gate.E.weight`` map to
``model.layers.N.block_sparse_moe.experts.E.w1.weight`` (w1 gate, w3 up, w2 down).

Undone converter transforms (``convert_hf_to_gguf.py``): for ``llama``-architecture files
(Mixtral) the converter permutes the rows of ``q_proj`` / ``k_proj`` (per head, the two
rotary halves interleaved, for ggml's adjacent-pair rope); :func:`unpermute_rows` restores
HF's order (row permutation of whole rows: valid for quantized rows too). For ``deepseek2``
the converter splits ``kv_b_proj`` into ``attn_k_b`` (transposed per head) and ``attn_v_b``;
:meth:`read` rebuilds ``kv_b_proj`` as a float tensor; the model loader keeps block-type parts as
stored instead (:meth:`GGUFIndex.kv_b_split`, ``layers/mla.py: SplitKVB``).

Tensor types: F32/F16/BF16 are plain tensors; the block types are
:mod:`moetier.quant.ggml` formats. The reader interface is the safetensors reader's
(``info`` gives a :class:`~moetier.weights.safetensors_io.QInfo` for a quantized tensor,
``is_quantized``, ``read_q`` / ``read_rows_q`` give a :class:`~moetier.quant.QTensor` in the
stored blocks), so linear weights stay quantized (``QLinear``, quantized experts) exactly as
for quantized safetensors checkpoints. ``read`` gives a float32 dequantization (used for the
token embedding, which is not a linear layer: :data:`DEQUANTIZE_AT_LOAD`). Other types
(IQ*, TQ*) raise one :class:`WeightError` naming the tensor, its type and the supported types.

The spec: :func:`config_from_gguf` turns the ``{arch}.*`` metadata into the HF-style config
``spec_from_config`` parses (no config.json needed). Architectures: ``qwen3moe``,
``qwen2moe``, ``llama`` (with experts: Mixtral; without: Llama), ``olmoe``, ``deepseek2``
(V2 / V3 / R1 / Kimi-K2 by its routing metadata), ``gpt-oss``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetier.errors import ConfigError, MoetierError, UnsupportedModelError, WeightError
from moetier.layers.mla import kv_b_from_parts
from moetier.quant import QTensor
from moetier.quant.ggml import PLAIN_TYPES, GGMLFormat, check_type, type_name
from moetier.spec import ModelSpec, spec_from_config
from moetier.weights.fileio import OpenFiles
from moetier.weights.safetensors_io import QInfo

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
TORCH_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def import_gguf() -> Any:
    """The ``gguf`` package, or one line naming the extra that installs it."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise MoetierError("reading GGUF files needs the gguf package: pip install 'moetier[gguf]'") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and not p.is_dir()


def split_parts(path: Path) -> list[Path]:
    """``x-00001-of-00003.gguf`` -> its three parts (all must exist); a plain file -> [path]."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in parts:
        if not p.exists():
            raise WeightError(f"{p}: part of the split GGUF {path.name} is missing")
    return parts


# ----------------------------------------------------------------------------- names

# blk.N.<gguf> -> model.layers.N.<ours> (several entries: aliases the model classes look up)
BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
    "post_attention_norm": ("post_attention_layernorm",),
    "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",),
    "attn_v": ("self_attn.v_proj",),
    "attn_output": ("self_attn.o_proj",),
    "attn_q_norm": ("self_attn.q_norm",),
    "attn_k_norm": ("self_attn.k_norm",),
    "attn_sinks": ("self_attn.sinks",),
    "attn_q_a": ("self_attn.q_a_proj",),
    "attn_q_a_norm": ("self_attn.q_a_layernorm",),
    "attn_q_b": ("self_attn.q_b_proj",),
    "attn_kv_a_mqa": ("self_attn.kv_a_proj_with_mqa",),
    "attn_kv_a_norm": ("self_attn.kv_a_layernorm",),
    "attn_kv_b": ("self_attn.kv_b_proj",),
    "ffn_gate_inp": ("mlp.gate", "mlp.router"),
    "exp_probs_b": ("mlp.gate.e_score_correction",),  # .bias -> e_score_correction_bias below
    "ffn_gate": ("mlp.gate_proj",),
    "ffn_up": ("mlp.up_proj",),
    "ffn_down": ("mlp.down_proj",),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_proj", "mlp.shared_experts.gate_proj"),
    "ffn_up_shexp": ("mlp.shared_expert.up_proj", "mlp.shared_experts.up_proj"),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj", "mlp.shared_experts.down_proj"),
    "ffn_gate_inp_shexp": ("mlp.shared_expert_gate",),
    "ffn_gate_exps": ("mlp.experts.gate_proj",),
    "ffn_up_exps": ("mlp.experts.up_proj",),
    "ffn_down_exps": ("mlp.experts.down_proj",),
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
OLD_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}  # blk.N.ffn_gate.E.weight (old Mixtral)
# block-typed tensors that are not linear weights: read as float32 (dequantized once at load)
DEQUANTIZE_AT_LOAD = {"model.embed_tokens.weight"}


def hf_names(gguf_name: str) -> list[str]:
    """Our names for one GGUF tensor name ([] when moetier does not use it)."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return []
    if base in GLOBAL_NAMES:
        return [f"{GLOBAL_NAMES[base]}.{suffix}"]
    m = re.match(r"^blk\.(\d+)\.(\w+?)(?:\.(\d+))?$", base)
    if not m:
        return []
    layer, kind, expert = m.group(1), m.group(2), m.group(3)
    if expert is not None:
        w = OLD_EXPERT.get(kind)
        return [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.{suffix}"] if w else []
    ours = BLOCK_NAMES.get(kind, ())
    out = []
    for o in ours:
        if kind.endswith("_exps"):  # fused expert tensors have no ".weight" (HF's fused layout)
            out.append(f"model.layers.{layer}.{o}" + ("" if suffix == "weight" else "_bias"))
        elif kind == "exp_probs_b":
            out.append(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        elif kind == "attn_sinks":
            out.append(f"model.layers.{layer}.{o}")
        else:
            out.append(f"model.layers.{layer}.{o}.{suffix}")
    return out


_OURS_TO_GGUF: dict[str, str] = {}  # the inverse of BLOCK_NAMES (first GGUF name wins for shared aliases)
for _kind, _ours in BLOCK_NAMES.items():
    for _o in _ours:
        _OURS_TO_GGUF.setdefault(_o, _kind)
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_tensor_name(hf_name: str) -> tuple[str, int | None] | None:
    """The GGUF tensor an HF checkpoint tensor goes into (the inverse of :func:`hf_names`):
    ``(gguf name, expert index)`` for one routed expert's slice of a merged ``*_exps`` tensor,
    ``(gguf name, None)`` otherwise; None when the tensor has no GGUF name. Mixtral's
    ``block_sparse_moe.experts.E.w1|w3|w2`` and ``block_sparse_moe.gate`` are the same tensors
    as ``mlp.experts.E.gate|up|down_proj`` and ``mlp.gate``."""
    for g, ours in GLOBAL_NAMES.items():
        if hf_name.startswith(ours + "."):
            return f"{g}.{hf_name[len(ours) + 1:]}", None
    m = _HF_EXPERT.match(hf_name)
    if m:
        layer, expert, w, suffix = m.groups()
        kind = next((k for k, v in OLD_EXPERT.items() if v == w), None) or _OURS_TO_GGUF.get(f"mlp.{w}")
        return (f"blk.{layer}.{kind}_exps.{suffix}", int(expert)) if kind else None
    m = _HF_BLOCK.match(hf_name)
    if not m:
        return None
    layer, part, suffix = m.groups()
    kind = _OURS_TO_GGUF.get(part.replace("block_sparse_moe.", "mlp.", 1))
    return (f"blk.{layer}.{kind}.{suffix}", None) if kind else None


def unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes convert_hf_to_gguf's llama q/k permutation.

    The converter maps HF rows ``[head, half, i]`` to GGUF rows ``[head, i, half]``; the
    returned index ``idx`` gives HF row ``r`` = GGUF row ``idx[r]``."""
    d = rows // n_head
    gguf_pos = torch.arange(rows).view(n_head, d // 2, 2)  # GGUF row number at [head, i, half]
    return gguf_pos.transpose(1, 2).reshape(rows)  # read in [head, half, i] order


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as stored: logical shape rows-first (GGUF lists dims innermost-first)."""

    name: str  # our (HF-style) name; gguf_name is the file's
    gguf_name: str
    file: Path
    type_id: int
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def stored(self) -> GGMLFormat | torch.dtype:
        return check_type(self.type_id, f"{self.file}: tensor '{self.gguf_name}'")

    @property
    def quantized(self) -> bool:
        return self.type_id not in PLAIN_TYPES

    @property
    def ggml_type(self) -> str:
        return type_name(self.type_id)

    @property
    def dtype(self) -> str:
        """The dtype :meth:`GGUFIndex.read` returns (safetensors spelling): F32 for block types."""
        return TORCH_NAMES[self.torch_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        s = self.stored
        return s if isinstance(s, torch.dtype) else torch.float32

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        s = self.stored
        cols = self.shape[-1]
        return s.row_bytes(cols) if isinstance(s, GGMLFormat) else cols * torch.empty(0, dtype=s).element_size()


class GGUFFile:
    """Header of one .gguf file: metadata (key -> Python value) and tensor table."""

    def __init__(self, path: Path):
        gguf = import_gguf()
        try:
            size = path.stat().st_size
        except OSError as e:
            raise WeightError(f"{path}: cannot read GGUF file ({e.strerror})") from None
        try:
            r = gguf.GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError / struct errors on bad headers
            raise WeightError(f"{path}: not a valid GGUF file ({e})") from None
        self.path = path
        self.meta: dict[str, Any] = {}
        for name, f in r.fields.items():
            try:
                v = f.contents()
            except Exception:  # pragma: no cover - exotic field types
                continue
            self.meta[name] = v
        self.tensors: list[tuple[str, int, tuple[int, ...], int, int]] = []
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            start, n = int(t.data_offset), int(t.n_bytes)
            if start + n > size:
                raise WeightError(f"{path}: tensor '{t.name}' ends at byte {start + n} but the file has {size} "
                                  "(truncated file?)")
            self.tensors.append((t.name, int(t.tensor_type), shape, start, start + n))
        del r  # drops the header mapping


class GGUFIndex:
    """A GGUF model (one file or a split set) answering for HF-style tensor names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir = self.path  # for messages (SafetensorsIndex compatibility)
        parts = split_parts(self.path)
        files = [GGUFFile(p) for p in parts]
        self.meta: dict[str, Any] = dict(files[0].meta)
        self.arch = str(self.meta.get("general.architecture", ""))
        self.gguf: dict[str, GGUFTensorInfo] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}  # our name -> info (aliases included)
        self._canonical: list[str] = []
        for f in files:
            for gname, tid, shape, start, end in f.tensors:
                if gname in self.gguf:
                    raise WeightError(f"{f.path}: tensor '{gname}' is also in {self.gguf[gname].file.name}")
                names = hf_names(gname)
                info = GGUFTensorInfo(names[0] if names else gname, gname, f.path, tid, shape, start, end)
                self.gguf[gname] = info
                for n in names:
                    self.tensors[n] = GGUFTensorInfo(n, gname, f.path, tid, shape, start, end)
                if names:
                    self._canonical.append(names[0])
        self._files = OpenFiles()
        self._unpermute: dict[str, int] = {}  # our name -> n_head for llama-arch q/k rows
        if self.arch == "llama":
            nh = int(self.meta.get("llama.attention.head_count", 0))
            nkv = int(self.meta.get("llama.attention.head_count_kv", nh))
            for n in self.tensors:
                if n.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                    self._unpermute[n] = nh
                elif n.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                    self._unpermute[n] = nkv
        # deepseek2: kv_b_proj rebuilt from attn_k_b / attn_v_b
        self._kv_b: dict[str, tuple[str, str]] = {}
        for g in list(self.gguf):
            m = re.match(r"^blk\.(\d+)\.attn_k_b\.weight$", g)
            if m and f"blk.{m[1]}.attn_v_b.weight" in self.gguf:
                kb, vb = self.gguf[g], self.gguf[f"blk.{m[1]}.attn_v_b.weight"]
                nh, C, dn = kb.shape
                dv = vb.shape[1]
                name = f"model.layers.{m[1]}.self_attn.kv_b_proj.weight"
                # a logical float32 tensor [nh * (dn + dv), C]; no single byte range
                self.tensors[name] = GGUFTensorInfo(name, g, kb.file, 0, (nh * (dn + dv), C), 0, 0)
                self._kv_b[name] = (g, f"blk.{m[1]}.attn_v_b.weight")
                self._canonical.append(name)

    # ----- queries -----
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self._canonical)

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightError(f"{self.path}: tensor '{name}' is missing from the GGUF file")
        return info

    def info(self, name: str) -> GGUFTensorInfo | QInfo:
        """A plain tensor's :class:`GGUFTensorInfo` or (block types) a :class:`QInfo`."""
        info = self._info(name)
        if not self.is_quantized(name):
            return info
        fmt = info.stored
        assert isinstance(fmt, GGMLFormat)
        return QInfo(name, fmt.name, info.shape, {"data": info}, (1, fmt.block_size), {})  # type: ignore[dict-item]

    def is_quantized(self, name: str) -> bool:
        info = self._info(name)
        return info.quantized and name not in DEQUANTIZE_AT_LOAD and name not in self._kv_b

    def spec(self, name: str | None = None) -> ModelSpec:
        return spec_from_gguf(self, name)

    # ----- raw reads -----
    def _pread_into(self, info: GGUFTensorInfo, out: torch.Tensor, offset: int) -> None:
        buf = out.view(-1).view(torch.uint8).numpy()
        if offset + buf.nbytes > info.end:
            raise WeightError(f"{info.file}: tensor '{info.gguf_name}': read past its end")
        self._files.pread_exact(info.file, buf, offset, f"tensor '{info.gguf_name}'")

    def _stored(self, info: GGUFTensorInfo, row0: int, nrows: int) -> torch.Tensor | QTensor:
        """Rows [row0, row0 + nrows) of the tensor flattened to 2-D [rows, cols], as stored
        (a QTensor, or a plain [nrows, cols] tensor)."""
        s = info.stored
        cols = info.shape[-1]
        if isinstance(s, GGMLFormat):
            if cols % s.block_size:
                raise WeightError(f"{info.file}: tensor '{info.gguf_name}' rows of {cols} values are not whole "
                                  f"{info.ggml_type} blocks")
            data = torch.empty((nrows, s.row_bytes(cols)), dtype=torch.uint8)
            if data.numel():
                self._pread_into(info, data, info.start + row0 * data.shape[1])
            return s.qtensor(data, cols)
        t = torch.empty((nrows, cols), dtype=s)
        if t.numel():
            self._pread_into(info, t, info.start + row0 * info.row_bytes)
        return t

    # ----- the reader interface -----
    def _as_stored(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor | QTensor:
        """Tensor ``name`` (or rows ``[a, b)`` of its 2-D view) as stored, q/k rows unpermuted."""
        info = self._info(name)
        if name in self._kv_b:
            return self._read_kv_b(name)
        n = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        a, b = rows or (0, n)
        w = self._stored(info, a, b - a)
        n_head = self._unpermute.get(name)
        if n_head:  # llama-arch q/k: whole rows (1-D bias: its values) back in HF's order
            idx = unpermute_rows(info.shape[0], n_head)
            if isinstance(w, QTensor):
                w = QTensor(w.fmt, w.shape, w.data[idx].contiguous(), block=w.block)
            else:
                w = w.view(info.shape)[idx].contiguous()
        return w

    def read_q(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | QTensor:
        """Tensor ``name``: a QTensor ``[rows, cols]`` in its stored blocks, or a plain tensor
        (its shape, cast to ``dtype``)."""
        if not self.is_quantized(name):
            return self.read(name, dtype)
        return self._as_stored(name, None)

    def read_rows_q(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor | QTensor:
        """``tensor[index]`` of a tensor with a leading (expert) dimension, as :meth:`read_q`:
        one pread of its contiguous byte range."""
        info = self._info(name)
        if len(info.shape) < 2 or not 0 <= index < info.shape[0]:
            raise WeightError(f"{info.file}: tensor '{info.gguf_name}' {list(info.shape)} has no row {index}")
        per = math.prod(info.shape[1:-1]) if len(info.shape) > 2 else 1
        w = self._as_stored(name, (index * per, (index + 1) * per))
        if isinstance(w, QTensor):
            return w
        t = w.view(info.shape[1:])
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a float tensor (block types dequantized to float32)."""
        info = self._info(name)
        w = self._as_stored(name, None)
        t = w.dequantize() if isinstance(w, QTensor) else w
        t = t.view(info.shape)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def read_rows(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self._info(name)
        w = self.read_rows_q(name, index)
        t = w.dequantize().view(info.shape[1:]) if isinstance(w, QTensor) else w
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, row: int | None = None) -> torch.Tensor:
        t = self.read(name) if row is None else self.read_rows(name, row)
        out.copy_(t.view(out.shape))
        return out

    def kv_b_kept(self, name: str) -> bool:
        """Whether ``kv_b_proj`` ``name`` is loaded as its stored parts (:meth:`kv_b_split`), from
        the headers."""
        parts = self._kv_b.get(name)
        if parts is None:
            return False
        for g in parts:
            s = self.gguf[g].stored
            if (s.block_size and self.gguf[g].shape[-1] % s.block_size if isinstance(s, GGMLFormat)
                    else s not in (torch.float32, torch.float16, torch.bfloat16)):
                return False
        return True

    def kv_b_split(self, name: str) -> tuple[torch.Tensor | QTensor, torch.Tensor | QTensor] | None:
        """``kv_b_proj`` ``name`` as its stored parts: ``attn_k_b`` [nh C, dn] and ``attn_v_b``
        [nh dv, C], each a QTensor (block types) or a plain float16 / bfloat16 / float32 tensor
        (the loader keeps them, ``layers/mla.py: SplitKVB``); None when ``name`` is no such pair
        (or a part's rows are not whole blocks: then :meth:`read` rebuilds it)."""
        return self._kv_b_parts(name) if self.kv_b_kept(name) else None

    def _kv_b_parts(self, name: str) -> tuple[torch.Tensor | QTensor, torch.Tensor | QTensor]:
        """``attn_k_b`` / ``attn_v_b`` of ``kv_b_proj`` ``name`` as stored, flattened to 2-D rows."""
        kb, vb = (self._stored(self.gguf[g], 0, math.prod(self.gguf[g].shape[:-1])) for g in self._kv_b[name])
        return kb, vb

    def _read_kv_b(self, name: str) -> torch.Tensor:
        kb = self.gguf[self._kv_b[name][0]]  # [nh, C, dn]
        return kv_b_from_parts(*self._kv_b_parts(name), num_heads=kb.shape[0]).contiguous()

    def close(self) -> None:
        self._files.close()


# ----------------------------------------------------------------------------- spec

ARCH_TO_HF = {
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM"),
    "gpt-oss": ("gpt_oss", "GptOssForCausalLM"),
}
SUPPORTED_ARCHS = ("qwen3moe", "qwen2moe", "llama", "olmoe", "deepseek2", "gpt-oss")


def config_from_gguf(index: GGUFIndex) -> dict[str, Any]:
    """An HF-style config dict from the GGUF metadata (what ``spec_from_config`` parses)."""
    meta, arch, src = index.meta, index.arch, str(index.path)
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{src}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = ...) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is ...:
                raise ConfigError(f"{src}: GGUF metadata '{arch}.{key}' is missing")
            return default
        if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): every layer equal here
            if len(set(v)) != 1:
                raise ConfigError(f"{src}: GGUF metadata '{arch}.{key}' varies per layer ({v[:8]}...); "
                                  "moetier needs one value")
            v = v[0]
        return v

    emb = index.gguf.get("token_embd.weight")
    if emb is None:
        raise WeightError(f"{src}: tensor 'token_embd.weight' is missing")
    n_exp = int(get("expert_count", 0))
    cfg: dict[str, Any] = {
        "vocab_size": int(get("vocab_size", emb.shape[0])),
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv", get("attention.head_count"))),
        "intermediate_size": int(get("feed_forward_length", get("expert_feed_forward_length", 1))),
        "max_position_embeddings": int(get("context_length", 4096)),
        # GGUF stores float32; configs are decimal (1e-05 -> 9.9999997e-06 -> 1e-05 again)
        "rms_norm_eps": float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in index.gguf,
        # bf16 files run in bf16; float32 otherwise (quantized files: float32 activations)
        "torch_dtype": "bfloat16" if meta.get("general.file_type") == 32 else "float32",
    }
    key_len = get("attention.key_length", None)
    if key_len is not None and arch != "deepseek2":
        cfg["head_dim"] = int(key_len)
    if n_exp:
        cfg["num_experts_per_tok"] = int(get("expert_used_count"))
    sliding = get("attention.sliding_window", None)
    rs_type = get("rope.scaling.type", None)
    if rs_type in ("yarn", "linear"):
        rs: dict[str, Any] = {"rope_type": rs_type, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length", None)
        if orig is not None:
            rs["original_max_position_embeddings"] = int(orig)
        for k, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = get(f"rope.scaling.{k}", None)
            if v is not None:
                rs[ours] = float(v)
        cfg["rope_scaling"] = rs

    gating = int(get("expert_gating_func", 0))  # 1 softmax, 2 sigmoid (llama.cpp's enum)
    if arch in ARCH_TO_HF:
        mt, hf = ARCH_TO_HF[arch]
        cfg.update(model_type=mt, architectures=[hf])
        if n_exp:
            cfg["num_experts"] = cfg["num_local_experts"] = n_exp
            cfg["moe_intermediate_size"] = int(get("expert_feed_forward_length", cfg["intermediate_size"]))
        if arch == "qwen3moe":
            cfg["norm_topk_prob"] = bool(get("expert_weights_norm", True))  # llama.cpp: always renormalised
        elif arch == "qwen2moe":
            cfg["norm_topk_prob"] = bool(get("expert_weights_norm", False))
            cfg["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length", 0))
        elif arch == "olmoe":
            cfg["norm_topk_prob"] = bool(get("expert_weights_norm", False))
            cfg["intermediate_size"] = cfg["moe_intermediate_size"]
        elif arch == "gpt-oss":
            cfg["intermediate_size"] = cfg["moe_intermediate_size"]
            cfg["sliding_window"] = int(sliding) if sliding else None
            cfg["swiglu_limit"] = 7.0
            cfg["attention_bias"] = "blk.0.attn_q.bias" in index.gguf
            if "rope_scaling" in cfg:
                cfg["rope_scaling"]["truncate"] = False  # gpt-oss's YaRN (llama.cpp's too) keeps fractional bounds
    elif arch == "llama":
        if n_exp:
            cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=n_exp,
                       intermediate_size=int(get("expert_feed_forward_length", cfg["intermediate_size"])))
            cfg["sliding_window"] = int(sliding) if sliding else None
        else:
            cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        cfg["attention_bias"] = "blk.0.attn_q.bias" in index.gguf
    elif arch == "deepseek2":
        # V3 / R1 / Kimi-K2 carry exp_probs_b (the score-correction bias) and route with sigmoid
        # scores; the converter writes expert_gating_func only when config.json names scoring_func
        v3 = gating == 2 or any(n.endswith("exp_probs_b.bias") for n in index.gguf)
        if gating == 0:
            gating = 2 if v3 else 1
        cfg.update(model_type="deepseek_v3" if v3 else "deepseek_v2",
                   architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"])
        kv_lora = int(get("attention.kv_lora_rank"))
        rope_d = int(get("rope.dimension_count"))
        k_mla = get("attention.key_length_mla", None)
        v_mla = get("attention.value_length_mla", None)
        if k_mla is None:  # older files: key_length = nope + rope, value_length = v_head_dim
            k_mla, v_mla = get("attention.key_length"), get("attention.value_length")
        n_group = int(get("expert_group_count", 1))
        cfg.update(
            num_key_value_heads=cfg["num_attention_heads"],
            kv_lora_rank=kv_lora, q_lora_rank=int(get("attention.q_lora_rank", 0)) or None,
            qk_rope_head_dim=rope_d, qk_nope_head_dim=int(k_mla) - rope_d, v_head_dim=int(v_mla),
            first_k_dense_replace=int(get("leading_dense_block_count", 0)),
            n_routed_experts=n_exp, n_shared_experts=int(get("expert_shared_count", 0)),
            moe_intermediate_size=int(get("expert_feed_forward_length", 0)),
            routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            scoring_func="sigmoid" if gating == 2 else "softmax",
            n_group=n_group, topk_group=int(get("expert_group_used_count", 1)),
            topk_method="noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
        )
        log_mul = get("rope.scaling.yarn_log_multiplier", None)
        if "rope_scaling" in cfg and log_mul is not None:
            cfg["rope_scaling"]["mscale_all_dim"] = float(log_mul) / 0.1
            cfg["rope_scaling"]["mscale"] = cfg["rope_scaling"]["mscale_all_dim"]
    if sliding and arch in ("qwen3moe", "qwen2moe"):
        cfg.update(use_sliding_window=True, sliding_window=int(sliding))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        cfg["eos_token_id"] = int(eos)
    return cfg


def spec_from_gguf(index: GGUFIndex, name: str | None = None) -> ModelSpec:
    display = name or re.sub(r"-\d{5}-of-\d{5}$", "", index.path.stem)
    return spec_from_config(config_from_gguf(index), name=display, source=f"{index.path} (GGUF metadata)")


def load_gguf_spec(path: str | Path, name: str | None = None) -> ModelSpec:
    return GGUFIndex(path).spec(name)


# ----------------------------------------------------------------------------- experts


def expert_reader(index: GGUFIndex, spec: ModelSpec, dtype: torch.dtype) -> Any:
    """The :class:`~moetier.models.base.ExpertReader` of a GGUF file (every family: GGUF stores
    gate, up and down separately, merged over experts, with optional biases)."""
    from moetier.models.base import ExpertReader, ExpertWeights

    class GGUFExpertReader(ExpertReader):
        """Experts of ``blk.N.ffn_{gate,up,down}_exps`` (+ ``.bias``: gpt-oss), or the older
        per-expert ``blk.N.ffn_{gate,up,down}.E`` tensors (Mixtral)."""

        def __init__(self) -> None:
            self.index, self.spec, self.dtype = index, spec, dtype
            H, I, E = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
            self.names: dict[int, tuple[str, str, str, bool]] = {}  # layer -> gate, up, down, merged
            for layer in spec.moe_layer_ids:
                p = f"model.layers.{layer}"
                if f"{p}.mlp.experts.gate_proj" in index:
                    g, u, d = (f"{p}.mlp.experts.{w}_proj" for w in ("gate", "up", "down"))
                    self._check(g, (E, I, H))
                    self._check(u, (E, I, H))
                    self._check(d, (E, H, I))
                    self.names[layer] = (g, u, d, True)
                elif f"{p}.block_sparse_moe.experts.0.w1.weight" in index:
                    t = f"{p}.block_sparse_moe.experts.{{e}}.{{w}}.weight"
                    for e in range(E):
                        self._check(t.format(e=e, w="w1"), (I, H))
                        self._check(t.format(e=e, w="w3"), (I, H))
                        self._check(t.format(e=e, w="w2"), (H, I))
                    self.names[layer] = (t.replace("{w}", "w1"), t.replace("{w}", "w3"), t.replace("{w}", "w2"),
                                         False)
                else:
                    raise WeightError(f"{index.path}: no routed-expert tensors for MoE layer {layer} "
                                      f"(looked for blk.{layer}.ffn_gate_exps.weight and "
                                      f"blk.{layer}.ffn_gate.0.weight)")

            self.quantized = any(index.is_quantized(n.format(e=0)) for names in self.names.values()
                                 for n in names[:3])

        def _part(self, name: str, expert: int, merged: bool) -> torch.Tensor | QTensor:
            """One expert's weight: a QTensor in its stored blocks (merged tensors: one pread of
            the expert's byte range) or a plain tensor in ``dtype`` checked finite."""
            n = name if merged else name.format(e=expert)
            w = self.index.read_rows_q(n, expert, self.dtype) if merged else self.index.read_q(n, self.dtype)
            return w if isinstance(w, QTensor) else self._finite(n, w)

        def _bias(self, name: str, expert: int) -> torch.Tensor | None:
            b = f"{name}_bias"
            return self._part(b, expert, True) if b in self.index else None  # type: ignore[return-value]

        def read(self, layer: int, expert: int) -> ExpertWeights:
            names = self.names.get(layer)
            if names is None or not 0 <= expert < self.spec.num_experts:
                raise WeightError(f"layer {layer} expert {expert}: no such routed expert")
            g, u, d, merged = names
            gate, up, down = (self._part(n, expert, merged) for n in (g, u, d))
            biases = [self._bias(n, expert) if merged else None for n in (g, u, d)]
            return ExpertWeights.from_parts(gate, up, down, *biases)

        def layer_structure(self, layer: int) -> tuple[Any, ...] | None:
            """Per expert tensor of ``layer``: its ggml type (or dtype) and shape. llama.cpp's
            K-quant recipes mix types across layers (Q4_K_M: ``ffn_down_exps`` Q6_K in some)."""
            names = self.names.get(layer)
            if names is None:
                return None
            return tuple((getattr(i, "fmt", None) or i.dtype, tuple(i.shape))
                         for i in (self.index.info(n.format(e=0)) for n in names[:3]))

        def expert_nbytes(self) -> int:
            """Bytes of one expert: stored bytes (quantized) or in the runtime dtype."""
            if not self.quantized:
                return super().expert_nbytes() + sum(
                    self.index.info(f"{n}_bias").shape[-1] for n in self.names[self.spec.moe_layer_ids[0]][:3]
                    if f"{n}_bias" in self.index) * torch.empty(0, dtype=self.dtype).element_size()
            g, u, d, merged = self.names[self.spec.moe_layer_ids[0]]
            E = self.spec.num_experts
            total = 0
            for n in (g, u, d):
                total += self.index.info(n).nbytes // E if merged else self.index.info(n.format(e=0)).nbytes
                if f"{n}_bias" in self.index:
                    total += self.index.info(f"{n}_bias").shape[-1] * torch.empty(0, dtype=self.dtype).element_size()
            return total

    return GGUFExpertReader()


# ----------------------------------------------------------------------------- bytes


def stored_census(path: str | Path, cen: Any, dtype: torch.dtype) -> Any:
    """``cen`` (a :class:`~moetier.planner.census.Census` of the GGUF's spec) with the byte
    figures the runtime will hold: quantized linear weights and experts at their stored size
    (what the slots and ``QLinear`` keep), other tensors in the runtime ``dtype``. The weight
    hierarchy sizes its budget check and slots from this (a Q4_K file needs ~1/4 of bf16)."""
    from dataclasses import replace

    index = GGUFIndex(path)
    spec = cen.spec
    item = torch.empty(0, dtype=dtype).element_size()
    expert_names = {f"model.layers.{i}.mlp.experts.{w}_proj" for i in spec.moe_layer_ids
                    for w in ("gate", "up", "down")}
    always, routed = 0, 0
    for info in index.gguf.values():
        names = hf_names(info.gguf_name)
        if not names:
            continue
        name = names[0]
        q = name in index.tensors and index.is_quantized(name)
        n = info.nbytes if q else math.prod(info.shape) * item
        if name in expert_names or name.removesuffix("_bias") in expert_names or ".block_sparse_moe.experts." in name:
            routed += n
        else:
            always += n
    for name, parts in index._kv_b.items():  # attn_k_b / attn_v_b kept as stored, or a rebuilt float tensor
        if index.kv_b_kept(name):
            always += sum(index.gguf[g].nbytes for g in parts)
        else:
            always += math.prod(index.tensors[name].shape) * item
    n_exp = max(1, spec.num_experts * spec.num_moe_layers)
    return replace(cen, always_on_bytes=float(always), routed_bytes=float(routed),
                   total_bytes=float(always + routed), expert_bytes=float(routed / n_exp),
                   active_bytes=float(always + spec.top_k * spec.num_moe_layers * routed / n_exp))


def _census_group(gguf_name: str) -> str | None:
    """The census group (moetier.planner.census.GROUPS) of one GGUF tensor."""
    if gguf_name.startswith("token_embd."):
        return "embedding"
    if gguf_name.startswith("output."):
        return "lm_head"
    if gguf_name.startswith("output_norm."):
        return "norms"
    m = re.match(r"^blk\.\d+\.(\w+?)(?:\.\d+)?\.(weight|bias)$", gguf_name)
    if not m:
        return None
    kind = m.group(1)
    if kind.endswith("norm"):
        return "norms"
    if kind.endswith("_exps") or re.match(r"^blk\.\d+\.ffn_\w+\.\d+\.", gguf_name):
        return "routed_experts"
    if kind.endswith("_shexp"):
        return "shared_experts"
    if kind in ("ffn_gate_inp", "exp_probs_b"):
        return "router"
    if kind.startswith("ffn_"):
        return "dense_ffn"
    if kind.startswith("attn_"):
        return "attention"
    return None


_PLANNER_FORMAT = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "mxfp4": "fp4"}


def _stored_by_group(index: GGUFIndex) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Per census group: stored bytes, and bytes per ggml type (lower case)."""
    size: dict[str, int] = {}
    types: dict[str, dict[str, int]] = {}
    for info in index.gguf.values():
        g = _census_group(info.gguf_name)
        if g is None:
            continue
        t = info.ggml_type.lower()
        size[g] = size.get(g, 0) + info.nbytes
        types.setdefault(g, {})[t] = types.get(g, {}).get(t, 0) + info.nbytes
    return size, types


def file_precision(path: str | Path, spec: Any, index: GGUFIndex | None = None) -> Any:
    """The GGUF file's stored formats as a planner precision (``moetier plan MODEL.gguf``): per
    census group, the ggml type holding most of its bytes (its kernel rate and FLOPs) and the
    group's exact stored bytes per parameter (a Q4_K_M group mixes Q4_K and Q6_K tensors)."""
    from moetier.planner.census import Precision, census

    size, types = _stored_by_group(index or GGUFIndex(path))
    params = census(spec, "bf16").groups
    fmts, stored = [], []
    for g, gc in params.items():
        if g in types:
            top = max(types[g], key=lambda t: types[g][t])
            fmts.append((g, _PLANNER_FORMAT.get(top, top)))
            if gc.params:
                stored.append((g, size[g] / gc.params))
        else:  # not in the file (a tied LM head, no MTP layer): as the embedding, else bf16
            fmts.append((g, next((f for n, f in fmts if n == "embedding"), "bf16")))
    return Precision(name="as stored in the GGUF file", formats=tuple(fmts), stored=tuple(stored))


def file_census(path: str | Path, spec: Any) -> Any:
    """``spec``'s census with every group's bytes as stored in the GGUF file, and the stored ggml
    types (all of a group's, joined with ``+``) as each group's format (``moetier census MODEL.gguf``)."""
    from dataclasses import replace

    from moetier.planner.census import census

    index = GGUFIndex(path)
    prec = file_precision(path, spec, index)
    _, types = _stored_by_group(index)
    shown = tuple((g, "+".join(sorted(types[g])) if g in types else "-") for g, _ in prec.formats)
    c = census(spec, prec)
    return replace(c, precision=replace(prec, formats=shown))
