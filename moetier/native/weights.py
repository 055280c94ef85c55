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
SCALE_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}  # DT_*: uint8 = e8m0


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


def describe(w: torch.Tensor | QTensor, out: MtWeight | None = None, what: str = "weight") -> MtWeight:
    """The descriptor of ``w`` (filled into ``out`` when given; then the caller keeps ``w``
    alive). ``what`` names the weight in errors."""
    d = MtWeight() if out is None else out
    if isinstance(w, QTensor):
        _describe_q(w, d, what)
    else:
        code = PLAIN_CODES.get(w.dtype)
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
    code = q.format.code
    if not supported(code):
        raise WeightError(f"{what}: the native kernels do not read format {q.fmt!r} (code {code})")
    d.fmt, d.rows, d.cols = code, q.rows, q.cols
    d.data, d.stride = q.data.data_ptr(), _row_stride_bytes(q.data, what)
    d.brows, d.bcols, d.row0, d.flags = q.block[0], q.block[1], q.row0, 0
    if q.scale is not None:
        if q.scale.dtype not in SCALE_DT:
            raise WeightError(f"{what}: scale dtype {q.scale.dtype} is not supported natively")
        s = q.scale if q.scale.dim() == 2 else q.scale.view(-1, 1)
        d.scale, d.sstride, d.sdt = s.data_ptr(), _row_stride_bytes(s, what + " scale"), SCALE_DT[s.dtype]
    else:
        d.scale, d.sstride, d.sdt = None, 0, 0
    if q.zero is not None:
        z = q.zero if q.zero.dim() == 2 else q.zero.view(-1, 1)
        d.zero, d.zstride = z.data_ptr(), _row_stride_bytes(z, what + " zero point")
    else:
        d.zero, d.zstride = None, 0
