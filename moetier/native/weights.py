"""Weight descriptors for the native kernels: :func:`describe` turns a ``torch.Tensor`` or a
:class:`~moetier.quant.QTensor` into an :class:`MtWeight` (``mt_weight`` in csrc/mt.h) that
points at the weight's stored bytes (no copy, no dequantization).

The descriptor holds raw pointers: it keeps a reference to the tensors it points into
(``MtWeight._keep``), and when filled in place (``out=``) the caller keeps them alive.
"""

from __future__ import annotations

import ctypes

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor

__all__ = ["PLAIN_CODES", "MtWeight", "describe", "supported"]

PLAIN_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # MT_FMT_F32 / BF16 / F16
BF16_F32X = 3  # MT_FMT_BF16_F32X: bf16 weights, float32 activations
SCALE_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}  # DT_*: uint8 = e8m0

# QTensor format name -> (MT_FMT_* code, block columns of the stored layout: 0 = free, bytes per
# block for GGUF types with inline scales). The codes are moetier/quant's table.
GGML_BLOCKS = {"q4_0": (102, 32, 18), "q4_1": (103, 32, 20), "q5_0": (106, 32, 22), "q5_1": (107, 32, 24),
               "q8_0": (108, 32, 34), "q2_k": (110, 256, 84), "q3_k": (111, 256, 110), "q4_k": (112, 256, 144),
               "q5_k": (113, 256, 176), "q6_k": (114, 256, 210), "ggml_mxfp4": (139, 32, 17)}
CODES = {"fp8_e4m3_block": 10, "mxfp4": 11, "int4_group": 12, "int8_group": 13,
         **{k: v[0] for k, v in GGML_BLOCKS.items()}}


class MtWeight(ctypes.Structure):
    """Mirror of ``mt_weight`` in csrc/mt.h (keep the field order in sync)."""

    _fields_ = [
        ("fmt", ctypes.c_int), ("sdt", ctypes.c_int), ("rows", ctypes.c_long), ("cols", ctypes.c_long),
        ("data", ctypes.c_void_p), ("stride", ctypes.c_long),
        ("scale", ctypes.c_void_p), ("sstride", ctypes.c_long),
        ("zero", ctypes.c_void_p), ("zstride", ctypes.c_long),
        ("brows", ctypes.c_int), ("bcols", ctypes.c_int), ("row0", ctypes.c_int), ("flags", ctypes.c_int),
    ]


def supported(code: int) -> bool:
    """The native kernels read weights of format ``code``."""
    from moetier import native

    lib = native.library()
    return lib is not None and bool(lib.mt_fmt_supported(code))


def _row_stride_bytes(t: torch.Tensor, what: str) -> int:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise WeightError(f"{what}: native kernels need 2-D weights with contiguous rows "
                          f"(got shape {tuple(t.shape)}, strides {t.stride()})")
    return t.stride(0) * t.element_size()


def rows(w: torch.Tensor | QTensor, a: int, n: int) -> torch.Tensor | QTensor:
    """Rows ``[a, a + n)`` of a 2-D weight, sharing its memory (a quantized one's scales too)."""
    return w.row_slice(a, a + n) if isinstance(w, QTensor) else w[a:a + n]


def describe(w: torch.Tensor | QTensor, out: MtWeight | None = None, what: str = "weight",
             x_f32: bool = False) -> MtWeight:
    """The descriptor of ``w`` (filled into ``out`` when given; then the caller keeps ``w``
    alive). ``what`` names the weight in errors. A bfloat16 ``w`` multiplies activations
    rounded to bf16 (the bf16 product rule of torch and llama.cpp; on AVX512-BF16 CPUs the
    kernels run ``vdpbf16ps``), unless ``x_f32``: bf16 weights inside a float32 model (a GGUF
    tensor read in place) keep float32 activations."""
    d = MtWeight() if out is None else out
    if isinstance(w, QTensor):
        _describe_q(w, d, what)
    else:
        code = BF16_F32X if x_f32 and w.dtype == torch.bfloat16 else PLAIN_CODES.get(w.dtype)
        if code is None:
            raise WeightError(f"{what}: dtype {w.dtype} is not a native weight dtype "
                              f"(expected float32, bfloat16 or float16)")
        d.fmt, d.sdt = code, 0
        d.rows, d.cols = w.shape[0], (w.shape[1] if w.dim() == 2 else 0)
        d.stride = _row_stride_bytes(w, what)
        d.data = w.data_ptr()
        d.scale = d.zero = None
        d.sstride = d.zstride = d.brows = d.bcols = d.row0 = d.flags = 0
    if out is None:
        d._keep = w
    return d


def _describe_q(q: QTensor, d: MtWeight, what: str) -> None:
    code = CODES.get(q.fmt)
    if code is None or not supported(code):
        raise WeightError(f"{what}: the native kernels do not read format {q.fmt!r}")
    rows, cols = q.shape
    d.fmt, d.rows, d.cols = code, rows, cols
    d.data, d.stride = q.data.data_ptr(), _row_stride_bytes(q.data, what)
    d.brows, d.bcols, d.row0, d.flags = q.block[0], q.block[1], q.row0, 0
    row_bytes = q.data.shape[1] * q.data.element_size()
    if q.data.shape[0] < rows:
        raise WeightError(f"{what}: {q.fmt} data has {q.data.shape[0]} rows, expected {rows}")
    if q.fmt in GGML_BLOCKS:
        _, bs, nb = GGML_BLOCKS[q.fmt]
        if cols % bs or row_bytes < cols // bs * nb:
            raise WeightError(f"{what}: {q.fmt} rows of {cols} values need a multiple of {bs} values and "
                              f"{cols // bs * nb} bytes per row (got {row_bytes})")
        d.scale, d.sstride, d.sdt, d.zero, d.zstride = None, 0, 0, None, 0
        return
    bits = {"fp8_e4m3_block": 8, "mxfp4": 4, "int4_group": 4, "int8_group": 8}[q.fmt]
    br, bc = q.block
    if br < 1 or bc < 1 or (bits == 4 and bc % 2) or (q.fmt == "mxfp4" and q.block != (1, 32)):
        raise WeightError(f"{what}: {q.fmt} block {list(q.block)} is not supported natively")
    if row_bytes < (cols * bits + 7) // 8:
        raise WeightError(f"{what}: {q.fmt} rows hold {row_bytes} bytes, {cols} values need {(cols * bits + 7) // 8}")
    s = q.scale
    if s is None or s.dtype not in SCALE_DT or (q.fmt == "mxfp4") != (s.dtype == torch.uint8):
        raise WeightError(f"{what}: {q.fmt} scale {None if s is None else s.dtype} is not supported natively")
    s = s if s.dim() == 2 else s.view(-1, 1)
    need = ((q.row0 + rows + br - 1) // br if rows else 0, (cols + bc - 1) // bc)
    if s.shape[0] < need[0] or s.shape[1] < need[1]:
        raise WeightError(f"{what}: {q.fmt} scale {list(s.shape)} is smaller than the {list(need)} blocks of "
                          f"a {list(q.shape)} weight")
    d.scale, d.sstride, d.sdt = s.data_ptr(), _row_stride_bytes(s, what + " scale"), SCALE_DT[s.dtype]
    z = q.zero
    if z is not None:
        if z.dtype != torch.int8 or z.shape != s.shape:
            raise WeightError(f"{what}: zero points {z.dtype} {list(z.shape)}, expected int8 {list(s.shape)}")
        d.zero, d.zstride = z.data_ptr(), _row_stride_bytes(z, what + " zero point")
    else:
        d.zero, d.zstride = None, 0
