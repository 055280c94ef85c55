"""``fp8_e4m3_block``: FP8 e4m3 weights with one float32 scale per block (DeepSeek-V3 / R1,
Kimi-K2, Qwen3-*-FP8; ``quantization_config.quant_method = "fp8"``).

Stored layout (facts: DeepSeek-V3's release and its ``weight_dequant``; see
/work/shared/data/quant-formats.md):

* ``W`` ``F8_E4M3`` ``[rows, cols]`` and ``W_scale_inv`` float32
  ``[ceil(rows / br), ceil(cols / bc)]`` with ``(br, bc) = weight_block_size`` (``[128, 128]``);
* value ``W[i, j] = float(W[i, j]) * scale_inv[i // br, j // bc]``. Dims need not be
  multiples of the block (DeepSeek-V3's ``kv_a_proj_with_mqa`` is ``[576, 7168]``: its last
  row block has 64 rows).

QTensor: ``data`` float8_e4m3fn ``[rows, cols]``, ``scale`` float32 block grid,
``block = (br, bc)``, ``row0`` = offset of row 0 inside its first scale block row (row slices).
"""

from __future__ import annotations

import math

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor, register

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _expand(scale: torch.Tensor, block: tuple[int, int], row0: int, rows: int, cols: int) -> torch.Tensor:
    """The block grid ``scale`` as one float32 value per weight, ``[rows, cols]``."""
    br, bc = block
    s = scale.float().repeat_interleave(br, dim=0)[row0 : row0 + rows]
    return s.repeat_interleave(bc, dim=1)[:, :cols]


class Fp8Block:
    name = "fp8_e4m3_block"
    code = 10
    bits = 8.0 + 32.0 / (128 * 128)  # at the usual 128x128 block

    def dequantize(self, q: QTensor) -> torch.Tensor:
        assert q.scale is not None
        br, bc = q.block
        nbc = q.scale.shape[1]
        s = q.scale.float().repeat_interleave(br, dim=0)[q.row0 : q.row0 + q.rows]  # [rows, nbc]
        w = q.data.float()
        if nbc * bc != q.cols:  # a partial last column block: pad it
            w = torch.nn.functional.pad(w, (0, nbc * bc - q.cols))
        return (w.view(q.rows, nbc, bc) * s.unsqueeze(-1)).view(q.rows, nbc * bc)[:, : q.cols].contiguous()

    def validate(self, q: QTensor, where: str) -> None:
        br, bc = q.block
        if br < 1 or bc < 1:
            raise WeightError(f"{where}: FP8 block size {list(q.block)} must be positive")
        if q.data.dtype != torch.float8_e4m3fn:
            raise WeightError(f"{where}: FP8 block-scaled weight has dtype {q.data.dtype}, expected F8_E4M3")
        if q.data.dim() != 2 or tuple(q.data.shape) != q.shape:
            raise WeightError(f"{where}: FP8 weight has shape {list(q.data.shape)}, expected {list(q.shape)}")
        if q.scale is None or q.scale.dtype not in SCALE_DTYPES:
            got = None if q.scale is None else q.scale.dtype
            raise WeightError(f"{where}: FP8 block scale (weight_scale_inv) has dtype {got}, expected F32")
        want = (math.ceil((q.row0 + q.rows) / br), math.ceil(q.cols / bc))
        if tuple(q.scale.shape) != want:
            raise WeightError(
                f"{where}: FP8 block scale (weight_scale_inv) has shape {list(q.scale.shape)}, but a "
                f"{list(q.shape)} weight in {br}x{bc} blocks needs {list(want)}"
            )


FP8 = register(Fp8Block())


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> QTensor:
    """Round-to-nearest FP8 e4m3 with one float32 scale per block (scale = block amax / 448;
    an all-zero block gets scale 1). ``w`` [rows, cols] float."""
    rows, cols = w.shape
    br, bc = block
    nbr, nbc = math.ceil(rows / br), math.ceil(cols / bc)
    x = w.float()
    pad = torch.zeros(nbr * br, nbc * bc)
    pad[:rows, :cols] = x.abs()
    amax = pad.view(nbr, br, nbc, bc).amax(dim=(1, 3))  # [nbr, nbc]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    y = (x / _expand(scale, block, 0, rows, cols)).clamp(-E4M3_MAX, E4M3_MAX)
    return QTensor(FP8.name, (rows, cols), y.to(torch.float8_e4m3fn), scale.contiguous(), block=block)
