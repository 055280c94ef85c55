"""Lazy, validating safetensors reader.

A checkpoint directory holds one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. :class:`SafetensorsIndex` parses every header up front
(8-byte little-endian header length, then a JSON object ``name -> {dtype, shape,
data_offsets}``), validates it against the file size, and maps tensor name ->
:class:`TensorInfo` (file, dtype, shape, absolute byte range). Reading one tensor, or one
row-block of it (one expert of a fused ``[E, ...]`` tensor), is a single ``os.preadv`` into
a preallocated tensor: nothing is memory-mapped and nothing else is read.

Quantized checkpoints (``moetier.quant``): a *logical* tensor (the HF-style name of an
``nn.Linear`` weight, e.g. ``model.layers.3.mlp.experts.7.down_proj.weight``, or gpt-oss's
``model.layers.3.mlp.experts.down_proj``) may be stored as several tensors:

* FP8 block-scaled: ``X.weight`` (F8_E4M3) + ``X.weight_scale_inv`` (float32 block grid);
* gpt-oss MXFP4: ``P_blocks`` (uint8 ``[E, rows, cols/32, 16]``) + ``P_scales`` (``[E, rows, cols/32]``);
* compressed-tensors pack-quantized: ``X.weight_packed`` + ``X.weight_scale`` + ``X.weight_shape``
  (+ ``X.weight_zero_point``) under the logical name ``X.weight``.

They are recognised from the headers at open and validated up front (shapes of the companion
tensors against the weight, block / group size, dtypes: a :class:`WeightError` naming file and
tensor). :meth:`SafetensorsIndex.info` then gives a :class:`QInfo` (logical shape: rows = output
features; the stored format) for the logical name, ``name in index`` is true for it, and
:meth:`~SafetensorsIndex.read_q` / :meth:`~SafetensorsIndex.read_rows_q` return a
:class:`~moetier.quant.QTensor` in the stored bytes (``read_q`` of a plain tensor returns the
tensor). The companion tensors' own names stay readable with :meth:`~SafetensorsIndex.read`.

Every problem raises :class:`moetier.errors.WeightError` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor
from moetier.weights.fileio import OpenFiles

if TYPE_CHECKING:
    from moetier.spec import QuantConfig

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # plain weights (F8 only with block scales: QInfo)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class QInfo:
    """One logical quantized tensor: its format, logical shape and stored parts."""

    name: str  # logical name (what the loaders ask for)
    fmt: str  # moetier.quant format name, e.g. "fp8_e4m3_block"
    shape: tuple[int, ...]  # logical shape, rows = output features; optional leading expert dim
    parts: dict[str, TensorInfo]  # "data", "scale" (+ "zero") stored tensors
    block: tuple[int, int]
    meta: dict

    @property
    def file(self) -> Path:
        return self.parts["data"].file

    @property
    def dtype(self) -> str:  # for messages
        return self.fmt

    @property
    def nbytes(self) -> int:
        """Stored bytes of every part."""
        return sum(p.nbytes for p in self.parts.values())

    @property
    def where(self) -> str:
        return f"{self.file}: tensor '{self.parts['data'].name}'"


def parse_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors file's header (reads only the header)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise WeightError(f"{path}: cannot read safetensors file ({e.strerror})") from None
    if size < 8:
        raise WeightError(f"{path}: truncated safetensors file ({size} bytes; expected an 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightError(
                f"{path}: corrupt or truncated safetensors header (header length {n} bytes, file is {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise WeightError(f"{where}: header entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise WeightError(f"{where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WeightError(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise WeightError(f"{where}: invalid data_offsets {offs!r}")
        expect = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != expect:
            raise WeightError(
                f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but shape {shape} "
                f"{dtype} needs {expect}"
            )
        if offs[1] > data_len:
            raise WeightError(
                f"{where}: data ends at byte {data_start + offs[1]} but the file has only {size} bytes "
                "(truncated file?)"
            )
        out[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    return out


class SafetensorsIndex:
    """All tensors of a checkpoint directory, by name; reads single tensors with pread."""

    def __init__(self, directory: str | Path, quant: QuantConfig | None = None):
        self.dir = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.quantized: dict[str, QInfo] = {}  # logical name -> stored parts
        self._files = OpenFiles()
        index_path = self.dir / INDEX_NAME
        if index_path.exists():
            files, weight_map = self._read_index(index_path)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise WeightError(f"{self.dir}: no *.safetensors files (and no {INDEX_NAME})")
        for path in files:
            for name, info in parse_header(path).items():
                if name in self.tensors:
                    raise WeightError(
                        f"{path}: tensor '{name}' is also in {self.tensors[name].file.name} (duplicate)"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise WeightError(
                        f"{index_path}: lists tensor '{name}' in {fname}, but that file has no such tensor"
                    )
        self.quant = quant
        self._find_quantized()

    def _read_index(self, index_path: Path) -> tuple[list[Path], dict[str, str]]:
        try:
            idx = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightError(f"{index_path}: not valid JSON ({e})") from None
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise WeightError(f"{index_path}: expected a 'weight_map' object of tensor name -> file name")
        files = []
        for fname in sorted(set(wm.values())):
            p = self.dir / fname
            if Path(fname).name != fname:
                raise WeightError(f"{index_path}: shard name {fname!r} must be a plain file name")
            if not p.exists():
                raise WeightError(f"{p}: shard listed in {INDEX_NAME} is missing")
            files.append(p)
        return files, wm

    # ----- quantized tensors -----
    def _find_quantized(self) -> None:
        """Recognise and validate (from the headers) every quantized logical tensor."""
        t = self.tensors
        fp8_block = self.quant.fp8_block if self.quant is not None else (128, 128)
        for name, info in t.items():
            if name.endswith(".weight_scale_inv") and name[: -len("_scale_inv")] in t:
                w = t[name[: -len("_scale_inv")]]
                q = QInfo(w.name, "fp8_e4m3_block", w.shape, {"data": w, "scale": info}, fp8_block, {})
            elif name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in t:
                base = name[: -len("_blocks")]
                if len(info.shape) < 3:
                    raise WeightError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected MXFP4 "
                                      "blocks [..., rows, cols / 32, 16]")
                shape = (*info.shape[:-2], info.shape[-2] * 32)
                q = QInfo(base, "mxfp4", shape, {"data": info, "scale": t[base + "_scales"]}, (1, 32), {})
            elif name.endswith(".weight_packed"):
                q = self._int_group(name[: -len("_packed")], info)
            else:
                continue
            self._validate_q(q)
            self.quantized[q.name] = q

    def _int_group(self, base: str, packed: TensorInfo) -> QInfo:
        where = f"{packed.file}: tensor '{packed.name}'"
        missing = [s for s in ("_scale", "_shape") if base + s not in self.tensors]
        if missing:
            raise WeightError(f"{where}: pack-quantized weight without {base}{missing[0]}")
        scale, shp = self.tensors[base + "_scale"], self.tensors[base + "_shape"]
        if shp.dtype not in ("I64", "I32") or shp.shape[-1:] != (2,):
            raise WeightError(f"{shp.file}: tensor '{shp.name}' is {shp.dtype} {list(shp.shape)}, expected int [2]")
        rows, cols = (int(v) for v in self.read(shp.name).reshape(-1, 2)[0])
        lead = packed.shape[:-2]
        words = packed.shape[-1]
        bits = 4 if words == math.ceil(cols / 8) else 8 if words == math.ceil(cols / 4) else 0
        groups = scale.shape[-1] if scale.shape else 0
        cands = self.quant.int_groups if self.quant is not None and self.quant.int_groups else ((bits, 0, True),)
        group = next((g or cols for b, g, _ in cands if b == bits and math.ceil(cols / (g or cols)) == groups), 0)
        if not bits or not group:
            raise WeightError(
                f"{where}: {packed.dtype} {list(packed.shape)} with weight_scale {list(scale.shape)} does not fit a "
                f"[{rows}, {cols}] weight of 4- or 8-bit values in the groups of config.json's quantization_config"
            )
        parts = {"data": packed, "scale": scale}
        symmetric = base + "_zero_point" not in self.tensors
        if not symmetric:
            parts["zero"] = self.tensors[base + "_zero_point"]
        return QInfo(base, f"int{bits}_group", (*lead, rows, cols), parts, (1, group),
                     {"bits": bits, "symmetric": symmetric})

    def _validate_q(self, q: QInfo) -> None:
        """Shapes and dtypes of the parts, checked on meta tensors (nothing is read)."""
        p = q.parts

        def meta(i: TensorInfo, shape: tuple[int, ...] | None = None) -> torch.Tensor:
            return torch.empty(shape if shape is not None else i.shape, dtype=i.torch_dtype, device="meta")

        data, lead = p["data"], q.shape[:-2]
        for i in p.values():
            if i.shape[: len(lead)] != lead:
                raise WeightError(f"{i.file}: tensor '{i.name}' has shape {list(i.shape)}; its leading dims should "
                                  f"be {list(lead)} like '{data.name}'")
        rows, cols = q.shape[-2:]
        if q.fmt == "mxfp4":
            d = meta(data, (rows, math.prod(data.shape[len(lead) + 1 :])))
        else:
            d = meta(data, data.shape[len(lead):])
        zero = None
        if "zero" in p:
            z = p["zero"]
            bits, groups = q.meta["bits"], p["scale"].shape[-1]
            want = (*lead, math.ceil(rows * bits / 32), groups)
            if z.dtype != "I32" or z.shape != want:
                raise WeightError(f"{z.file}: tensor '{z.name}' is {z.dtype} {list(z.shape)}, expected I32 "
                                  f"{list(want)} (zero points packed along rows)")
            zero = torch.empty(rows, groups, dtype=torch.int8, device="meta")
        s = p["scale"]
        scale = meta(s, s.shape[len(lead):])
        QTensor(q.fmt, (rows, cols), d, scale, zero, q.block, meta=q.meta).validate(q.where)

    def _qtensor(self, q: QInfo, index: int | None) -> QTensor:
        """Read ``q`` (or its ``index``-th row of the leading dim) as a QTensor."""
        rd = (lambda n: self.read(n)) if index is None else (lambda n: self.read_rows(n, index))
        if len(q.shape) != (2 if index is None else 3):
            raise WeightError(f"{q.where}: {q.fmt} tensor of logical shape {list(q.shape)} read "
                              f"{'whole' if index is None else 'by rows'}: expected a 2-D weight")
        rows, cols = q.shape[-2:]
        data = rd(q.parts["data"].name)
        if q.fmt == "mxfp4":
            data = data.view(rows, -1)
        elif q.fmt == "fp8_e4m3_block" and data.dtype != torch.float8_e4m3fn:
            raise WeightError(f"{q.where}: FP8 block-scaled weight has dtype {q.parts['data'].dtype}, expected F8_E4M3")
        zero = None
        if "zero" in q.parts:
            from moetier.quant.intgroup import unpack_zero

            zero = unpack_zero(rd(q.parts["zero"].name), q.meta["bits"], rows)
        scale = rd(q.parts["scale"].name)
        if scale.is_floating_point() and not torch.isfinite(scale).all():
            raise WeightError(f"{q.file}: tensor '{q.parts['scale'].name}' contains NaN or Inf values")
        return QTensor(q.fmt, (rows, cols), data, scale, zero, q.block, meta=dict(q.meta)).validate(q.where)

    # ----- queries -----
    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.quantized

    def names(self) -> list[str]:
        """Stored tensor names (a quantized weight's parts, not its logical name)."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo | QInfo:
        """A stored tensor's header entry, or (logical name of a quantized weight) its :class:`QInfo`."""
        info = self.quantized.get(name) or self.tensors.get(name)
        if info is None:
            raise WeightError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return info

    def is_quantized(self, name: str) -> bool:
        return name in self.quantized

    def read_q(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | QTensor:
        """Tensor ``name``: a QTensor in its stored format, or a plain tensor (cast to ``dtype``)."""
        q = self.quantized.get(name)
        return self.read(name, dtype) if q is None else self._qtensor(q, None)

    def read_rows_q(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor | QTensor:
        """``tensor[index]`` of a tensor with a leading (expert) dim, as :meth:`read_q`."""
        q = self.quantized.get(name)
        if q is None:
            return self.read_rows(name, index, dtype)
        if not 0 <= index < q.shape[0]:
            raise WeightError(f"{q.where}: {list(q.shape)} has no row {index}")
        return self._qtensor(q, index)

    # ----- reads -----
    def _pread_into(self, info: TensorInfo, out: torch.Tensor, offset: int) -> None:
        self._files.pread_exact(info.file, out.view(-1).view(torch.uint8).numpy(), offset, f"tensor '{info.name}'")

    def _stored(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            q = self.quantized.get(name)
            if q is not None:
                raise WeightError(f"{q.where}: '{name}' is stored as {q.fmt}; read it with read_q")
            raise WeightError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return info

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one whole stored tensor (optionally cast to ``dtype``)."""
        info = self._stored(name)
        t = torch.empty(info.shape, dtype=info.torch_dtype)
        if t.numel():
            self._pread_into(info, t, info.start)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Read tensor ``name`` (or its row ``row``) straight into ``out`` (same dtype and
        element count, contiguous): no intermediate buffer. Returns ``out``."""
        info = self._stored(name)
        shape = info.shape if row is None else info.shape[1:]
        if row is not None and (not info.shape or not 0 <= row < info.shape[0]):
            raise WeightError(f"{info.file}: tensor '{name}' {list(info.shape)} has no row {row}")
        if out.dtype != info.torch_dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(f"read_into({name!r}): out must be contiguous {info.dtype} with shape {list(shape)}")
        offset = info.start if row is None else info.start + row * math.prod(shape) * info.itemsize
        if out.numel():
            self._pread_into(info, out, offset)
        return out

    def read_rows(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ``tensor[index]`` of a tensor with a leading (e.g. expert) dimension."""
        info = self._stored(name)
        if not info.shape or not 0 <= index < info.shape[0]:
            raise WeightError(f"{info.file}: tensor '{name}' {list(info.shape)} has no row {index}")
        row_shape = info.shape[1:]
        t = torch.empty(row_shape, dtype=info.torch_dtype)
        if t.numel():
            self._pread_into(info, t, info.start + index * math.prod(row_shape) * info.itemsize)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def close(self) -> None:
        self._files.close()
