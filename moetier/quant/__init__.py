"""Quantized weights: ONE tensor type (:class:`QTensor`) for every stored weight format.

A :class:`QTensor` is a 2-D weight ``[rows, cols]`` (rows = output features, the
``nn.Linear`` layout) kept in the bytes it was stored in: the checkpoint's FP8 block-scaled
values, gpt-oss's MXFP4 blocks, compressed-tensors' packed INT4/INT8 groups, or a GGUF
tensor's blocks. Nothing is dequantized at load: the native kernels read the stored bytes and
dequantize in registers; the torch path calls :meth:`QTensor.dequantize` per use (one weight
at a time, never a whole-model copy).

Each format is one :class:`Format` object in :data:`FORMATS` (``register``); its
``dequantize`` is the *reference* (plain torch, written from the format's public definition)
that every kernel is tested against. Formats live one module each:

* ``moetier/quant/fp8.py``       ``fp8_e4m3_block``  (DeepSeek-V3 / Kimi-K2 / Qwen3-FP8)
* ``moetier/quant/mxfp4.py``     ``mxfp4``           (gpt-oss experts)
* ``moetier/quant/intgroup.py``  ``int4_group``, ``int8_group`` (compressed-tensors pack-quantized)
* ``moetier/quant/ggml.py``      ``q8_0``, ``q4_0``, ``q4_k``, ``q6_k``, ... (GGUF block types)

Format codes (``Format.code``, the native kernels' ``MT_FMT_*``; one table, keep it in sync):
plain weights 0 f32, 1 bf16, 2 f16 (native only: plain weights stay torch tensors in Python);
10 fp8_e4m3_block, 11 mxfp4 (gpt-oss nibble order), 12 int4_group, 13 int8_group;
GGUF types 100 + ggml type id: 102 q4_0, 103 q4_1, 106 q5_0, 107 q5_1, 108 q8_0, 110 q2_k,
111 q3_k, 112 q4_k, 113 q5_k, 114 q6_k, 139 ggml_mxfp4 (GGUF's own MXFP4 block layout).

Tensor layout contract (all formats):

* ``data``: a contiguous-rows tensor whose dim 0 is the weight's rows; row ``r``'s packed
  values are ``data[r]`` (``data.stride(0)`` elements apart, so a strided row view such as
  gpt-oss's interleaved gate rows ``data[0::2]`` is valid without a copy). For GGUF formats a
  row is a run of whole blocks (scales inline), ``data`` is uint8 ``[rows, row_bytes]``.
* ``scale`` / ``zero``: the format's companion tensors, or ``None`` when scales are inline.
  ``block = (block_rows, block_cols)``: how many rows and columns one scale covers
  (FP8 ``(128, 128)``; groups ``(1, g)``; GGUF ``(1, 32 | 256)``).
* :meth:`QTensor.row_slice` gives rows ``[a, b)`` as a QTensor sharing memory (used for one
  expert's rows of a merged ``[E * rows, cols]`` tensor, and for q/k/v splits).

Plain float weights stay ``torch.Tensor``; code that accepts either uses :func:`dense` (a
float view for the torch path) and :func:`nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from moetier.errors import WeightError

__all__ = ["FORMATS", "Format", "QTensor", "dense", "get_format", "is_quantized", "nbytes", "register"]


class Format(Protocol):
    """One stored weight format (see the module docstring for the layout contract)."""

    name: str  # registry key, e.g. "fp8_e4m3_block", "q4_k"
    code: int  # the id the native kernels dispatch on (moetier/native/csrc/*.h: MT_FMT_*)
    bits: float  # stored bits per weight including scales (for census / planner bytes)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Reference dequantization: float32 ``[rows, cols]``."""
        ...

    def validate(self, q: QTensor, where: str) -> None:
        """Raise :class:`WeightError` (message starts with ``where``: file and tensor) when the
        companion tensors do not fit the weight (shape, dtype, block size)."""
        ...


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} registered twice")
    if any(f.code == fmt.code and f.name != fmt.name for f in FORMATS.values()):
        raise ValueError(f"format code {fmt.code} of {fmt.name!r} is already taken")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    f = FORMATS.get(name)
    if f is None:
        _load_builtin_formats()
        f = FORMATS.get(name)
    if f is None:
        raise WeightError(f"weight format {name!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
    return f


def _load_builtin_formats() -> None:
    """Import the format modules (each registers its formats); missing ones are skipped."""
    import importlib

    for mod in ("fp8", "mxfp4", "intgroup", "ggml"):
        try:
            importlib.import_module(f"moetier.quant.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"moetier.quant.{mod}":
                raise


@dataclass(frozen=True, eq=False)
class QTensor:
    """A 2-D quantized weight ``[rows, cols]`` in its stored format (see the module docstring)."""

    fmt: str
    shape: tuple[int, int]  # logical [rows, cols]
    data: torch.Tensor  # dim 0 = rows
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    block: tuple[int, int] = (1, 1)  # (rows, cols) covered by one scale
    row0: int = 0  # first row of `scale`'s block grid this tensor starts at (row slices of FP8 blocks)
    meta: dict = field(default_factory=dict)  # format-specific extras (e.g. {"symmetric": True})

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> str:  # for messages and reports
        return self.fmt

    @property
    def nbytes(self) -> int:
        """Stored bytes (values + scales + zero points) of these rows."""
        n = self.data[: self.rows].numel() * self.data.element_size()
        for t in (self.scale, self.zero):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[rows, cols]`` in ``dtype``, through the format's reference dequantizer."""
        w = self.format.dequantize(self)
        return w if w.dtype == dtype else w.to(dtype)

    def validate(self, where: str) -> QTensor:
        self.format.validate(self, where)
        return self

    def row_slice(self, start: int, stop: int) -> QTensor:
        """Rows ``[start, stop)`` sharing memory. Scales are sliced by block rows; a slice
        that starts inside an FP8 row block keeps the whole scale block row and records the
        offset in ``row0`` (the kernels and ``dequantize`` honour it)."""
        if not 0 <= start <= stop <= self.rows:
            raise ValueError(f"row_slice({start}, {stop}) of a {self.rows}-row tensor")
        br = self.block[0]
        scale, zero, row0 = self.scale, self.zero, self.row0
        if scale is not None and br > 1:
            b0, b1 = (row0 + start) // br, (row0 + stop + br - 1) // br
            scale = scale[b0:b1]
            zero = zero[b0:b1] if zero is not None else None
            row0 = (row0 + start) % br
        elif scale is not None:
            scale = scale[start:stop]
            zero = zero[start:stop] if zero is not None else None
        return replace(self, shape=(stop - start, self.cols), data=self.data[start:stop], scale=scale, zero=zero,
                       row0=row0)


def is_quantized(w: object) -> bool:
    return isinstance(w, QTensor)


def dense(w: torch.Tensor | QTensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor for the torch path: ``w`` itself, or its dequantized copy (per use)."""
    if isinstance(w, QTensor):
        return w.dequantize(dtype)
    return w if w.dtype == dtype else w.to(dtype)


def nbytes(w: torch.Tensor | QTensor | None) -> int:
    if w is None:
        return 0
    if isinstance(w, QTensor):
        return w.nbytes
    return w.numel() * w.element_size()
