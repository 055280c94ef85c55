"""``int4_group`` / ``int8_group``: compressed-tensors "pack-quantized" integer weights.

Stored layout (``quantization_config.quant_method = "compressed-tensors"``, ``format =
"pack-quantized"``; the ``compressed-tensors`` package is the reference decompressor):

* ``X.weight_packed`` int32 ``[rows, ceil(cols * bits / 32)]``: value ``j`` of a row sits in
  word ``j * bits // 32`` at bit ``j * bits % 32`` (8 nibbles or 4 bytes per word, little
  end first), stored with an offset ``+2**(bits-1)`` (unsigned); the signed value is
  ``u - 2**(bits-1)`` in ``[-8, 7]`` / ``[-128, 127]``;
* ``X.weight_scale`` (bf16 / f16 / f32) ``[rows, ceil(cols / g)]``, ``g`` = ``group_size``
  of the config group (channel-wise schemes: one group spanning the row);
* ``X.weight_shape`` int ``[2]``: the logical ``[rows, cols]``;
* asymmetric schemes only: ``X.weight_zero_point`` int32, the signed zero points packed the
  same way but **along dim 0** (``[ceil(rows * bits / 32), groups]``);
* value = ``(q - zero) * scale`` (zero = 0 when symmetric).

QTensor: ``data`` = ``weight_packed`` as stored (int32 ``[rows, words]``; viewed as bytes a
row is ``ceil(cols * bits / 8)`` bytes in value order, low nibble first like MXFP4),
``scale`` as stored, ``zero`` int8 ``[rows, groups]`` (unpacked at read: the file's packing
along rows cannot be row-sliced), ``block = (1, g)``, ``meta = {"bits": b, "symmetric": s}``.
"""

from __future__ import annotations

import math

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor, register

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 ``[rows, words]`` -> signed int32 values ``[rows, n]`` (the first ``n`` of each row)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits  # [per]
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, words, per]
    return u.flatten(-2)[:, :n] - (1 << (bits - 1))


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ints ``[rows, n]`` -> int32 ``[rows, ceil(n * bits / 32)]`` (inverse of :func:`unpack`)."""
    per = 32 // bits
    rows, n = values.shape
    u = torch.zeros(rows, math.ceil(n / per) * per, dtype=torch.int64)
    u[:, :n] = values.to(torch.int64) + (1 << (bits - 1))
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u.view(rows, -1, per) << shifts).sum(-1)  # [rows, words] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class IntGroup:
    def __init__(self, bits: int, code: int):
        self.bits_int = bits
        self.name = f"int{bits}_group"
        self.code = code
        self.bits = bits + 16.0 / 32  # bf16 scale per group of 32 (census uses its own group size)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        assert q.scale is not None
        g = q.block[1]
        v = unpack(q.data, self.bits_int, q.cols)  # [rows, cols]
        if q.zero is not None:
            v = v - q.zero.to(torch.int32).repeat_interleave(g, dim=1)[:, : q.cols]
        return v.float() * q.scale.float().repeat_interleave(g, dim=1)[:, : q.cols]

    def validate(self, q: QTensor, where: str) -> None:
        b = self.bits_int
        br, g = q.block
        if br != 1 or g < 1:
            raise WeightError(f"{where}: {self.name} block {list(q.block)}, expected [1, group size]")
        words = math.ceil(q.cols * b / 32)
        if q.data.dtype != torch.int32 or q.data.dim() != 2 or tuple(q.data.shape) != (q.rows, words):
            raise WeightError(
                f"{where}: weight_packed is {q.data.dtype} {list(q.data.shape)}, expected int32 "
                f"[{q.rows}, {words}] for a {list(q.shape)} weight of {b}-bit values"
            )
        groups = math.ceil(q.cols / g)
        if q.scale is None or q.scale.dtype not in SCALE_DTYPES or tuple(q.scale.shape) != (q.rows, groups):
            got = None if q.scale is None else f"{q.scale.dtype} {list(q.scale.shape)}"
            raise WeightError(f"{where}: weight_scale is {got}, expected a float [{q.rows}, {groups}] "
                              f"(one scale per {g} values of a {list(q.shape)} weight)")
        if q.zero is not None and (q.zero.dtype != torch.int8 or tuple(q.zero.shape) != (q.rows, groups)):
            raise WeightError(f"{where}: weight_zero_point unpacks to {q.zero.dtype} {list(q.zero.shape)}, "
                              f"expected int8 [{q.rows}, {groups}]")


INT4 = register(IntGroup(4, 12))
INT8 = register(IntGroup(8, 13))
BY_BITS = {4: INT4, 8: INT8}


def quantize(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype = torch.bfloat16) -> QTensor:
    """Symmetric round-to-nearest: per group of ``group`` values, ``scale = amax / qmax``
    (rounded to ``scale_dtype`` first), ``q = clamp(round(w / scale), -qmax - 1, qmax)``."""
    rows, cols = w.shape
    groups = math.ceil(cols / group)
    qmax = (1 << (bits - 1)) - 1
    x = torch.zeros(rows, groups * group)
    x[:, :cols] = w.float()
    amax = x.view(rows, groups, group).abs().amax(dim=-1)  # [rows, groups]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(scale_dtype)
    s = scale.float().repeat_interleave(group, dim=1)[:, :cols]
    q = torch.round(w.float() / s).clamp(-qmax - 1, qmax).to(torch.int32)
    return QTensor(BY_BITS[bits].name, (rows, cols), pack(q, bits), scale.contiguous(), block=(1, group),
                   meta={"bits": bits, "symmetric": True})


def unpack_zero(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """``weight_zero_point`` as stored (int32 packed along dim 0, ``[ceil(rows*bits/32), groups]``)
    -> int8 ``[rows, groups]``."""
    return unpack(packed.T.contiguous(), bits, rows).T.contiguous().to(torch.int8)


def pack_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_zero`."""
    return pack(zero.T, bits).T.contiguous()
