"""``mxfp4``: OCP Microscaling FP4 (e2m1 elements, one e8m0 scale per 32), gpt-oss layout.

Stored layout (gpt-oss-20b / 120b routed experts; ``quantization_config.quant_method =
"mxfp4"``; facts in /work/shared/data/quant-formats.md):

* ``P_blocks`` uint8 ``[E, rows, cols / 32, 16]``: 16 bytes = 32 e2m1 codes per group, the
  **low nibble first** (value ``2k`` is ``byte[k] & 0xF``, value ``2k + 1`` is ``byte[k] >> 4``);
* ``P_scales`` uint8 ``[E, rows, cols / 32]``: e8m0 exponents, one per group of 32 values;
* value = ``E2M1[code] * 2 ** (scale - 127)`` with the OCP MX spec's e2m1 table
  ``[0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]``; scale byte 255 is NaN.

QTensor: ``data`` uint8 ``[rows, 16 * groups]`` (a row-view of the blocks; gpt-oss's
interleaved gate / up rows are ``data[0::2]`` / ``data[1::2]`` without a copy), ``scale``
uint8 ``[rows, groups]``, ``block = (1, 32)``. ``cols`` may be less than ``32 * groups`` (the
tail of the last group is padding).
"""

from __future__ import annotations

import math

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor, register

GROUP = 32
# OCP MX v1.0, table of FP4 (E2M1) values by code
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, nbytes]`` -> e2m1 codes ``[rows, 2 * nbytes]`` (low nibble first)."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


class Mxfp4:
    name = "mxfp4"
    code = 11
    bits = 4.0 + 8.0 / GROUP

    def dequantize(self, q: QTensor) -> torch.Tensor:
        assert q.scale is not None
        vals = E2M1[unpack_codes(q.data).long()]  # [rows, 32 * groups]
        exp = q.scale.to(torch.int32) - 127  # [rows, groups]
        w = torch.ldexp(vals.view(q.rows, -1, GROUP), exp.unsqueeze(-1).float())
        w = torch.where(q.scale.unsqueeze(-1) == 255, torch.full_like(w, float("nan")), w)
        return w.view(q.rows, -1)[:, : q.cols]

    def validate(self, q: QTensor, where: str) -> None:
        groups = math.ceil(q.cols / GROUP)
        if q.block != (1, GROUP):
            raise WeightError(f"{where}: MXFP4 block {list(q.block)}, expected [1, {GROUP}]")
        if q.data.dtype != torch.uint8 or q.data.dim() != 2 or tuple(q.data.shape) != (q.rows, 16 * groups):
            raise WeightError(
                f"{where}: MXFP4 blocks have {q.data.dtype} {list(q.data.shape)} (as [rows, groups * 16]), "
                f"expected uint8 [{q.rows}, {16 * groups}] for a {list(q.shape)} weight"
            )
        if q.scale is None or q.scale.dtype != torch.uint8 or tuple(q.scale.shape) != (q.rows, groups):
            got = None if q.scale is None else f"{q.scale.dtype} {list(q.scale.shape)}"
            raise WeightError(f"{where}: MXFP4 scales are {got}, expected uint8 [{q.rows}, {groups}] "
                              f"(one e8m0 exponent per {GROUP} values)")


MXFP4 = register(Mxfp4())


def quantize(w: torch.Tensor) -> QTensor:
    """Round-to-nearest MXFP4 (OCP MX: shared exponent ``floor(log2(amax)) - 2``, elements
    rounded to the nearest e2m1 value, ties to the smaller magnitude, clamped to +-6)."""
    rows, cols = w.shape
    groups = math.ceil(cols / GROUP)
    x = torch.zeros(rows, groups * GROUP)
    x[:, :cols] = w.float()
    x = x.view(rows, groups, GROUP)
    amax = x.abs().amax(dim=-1)  # [rows, groups]
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2, torch.full_like(amax, -127))
    e = e.clamp(-127, 127)
    y = torch.ldexp(x, -e.unsqueeze(-1))  # elements in units of the shared scale
    mags = E2M1[:8]  # [8]
    code = (y.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # nearest magnitude (first on ties)
    code = code | ((y < 0).long() << 3)
    code = code.view(rows, groups * 16, 2).to(torch.uint8)
    data = code[..., 0] | (code[..., 1] << 4)
    scale = (e + 127).to(torch.uint8)
    return QTensor(MXFP4.name, (rows, cols), data.contiguous(), scale.contiguous(), block=(1, GROUP))
