"""GGUF (llama.cpp / ggml) tensor types: the block formats as :class:`~moetier.quant.Format` objects.

A GGUF tensor row is a run of whole blocks, scales inline; a :class:`~moetier.quant.QTensor`
of a ggml format holds ``data`` uint8 ``[rows, row_bytes]`` with ``block = (1, block_size)``
and no companion tensors. The reference dequantizers below are plain torch written from the
block definitions in ggml's ``ggml-common.h`` (``block_q4_K`` etc.); each is tested bit for
bit against ``gguf.quants.dequantize`` (tests/quant/test_ggml.py). Every one computes in
float32 with the same operation order as ggml's ``dequantize_row_*`` (``d * q``, ``d * q + m``,
``d * q - m``), which is what makes the results identical.

Block layouts (``QK_K = 256``; ``d``/``dmin`` are float16, ``q`` the quantized values):

========  ====  =====  ============================================================
type      id    bytes  layout of one block (weights per block)
========  ====  =====  ============================================================
Q4_0      2     18     d, 16 B nibbles (32): low nibbles = values 0..15, high = 16..31; v = d*(q-8)
Q4_1      3     20     d, m, 16 B nibbles (32); v = d*q + m
Q5_0      6     22     d, 4 B high bits (u32, bit j = value j), 16 B nibbles; v = d*(q-16)
Q5_1      7     24     d, m, 4 B high bits, 16 B nibbles; v = d*q + m
Q8_0      8     34     d, 32 int8; v = d*q
Q2_K      10    84     16 B scales (low nibble scale, high nibble min), 64 B 2-bit q, d, dmin (256)
Q3_K      11    110    32 B high-bit mask, 64 B 2-bit q, 12 B 6-bit scales (-32), d (256)
Q4_K      12    144    d, dmin, 12 B packed 6-bit scales+mins (8 sub-blocks of 32), 128 B nibbles (256)
Q5_K      13    176    d, dmin, 12 B scales+mins, 32 B high bits, 128 B nibbles (256)
Q6_K      14    210    128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, d; v = d*sc*(q-32) (256)
MXFP4     39    17     e8m0 exponent, 16 B e2m1 nibbles (low = values 0..15, high = 16..31) (32)
========  ====  =====  ============================================================

F32 / F16 / BF16 tensors are plain torch tensors (no Format); every other ggml type (IQ*,
TQ*, Q8_1, Q8_K, ...) is refused by :func:`check_type` with one line naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moetier.errors import WeightError
from moetier.quant import QTensor, register

QK_K = 256

# ggml type id -> name (the ones GGUF files carry; names as in llama.cpp's ggml_type enum)
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}
PLAIN_TYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian float16)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] uint8 -> [n, 2k] uint8 in ggml's 32-block order: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, nbits: int) -> torch.Tensor:
    """[n, k] uint8 -> [n, 8/nbits, k]: field j of every byte (bits j*nbits .. j*nbits+nbits-1)."""
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8).view(1, -1, 1)
    return (b.unsqueeze(1) >> shifts) & ((1 << nbits) - 1)


# ----- legacy 32-weight blocks -----------------------------------------------------------------

def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])  # [n, 1]
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8  # [n, 32]
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).float()
    return d * q + m


def _high_bits32(b: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 (a little-endian u32) -> [n, 32] uint8: bit j of the u32 for value j."""
    return _bits(b, 1).permute(0, 2, 1).reshape(b.shape[0], 32)  # byte i bit k -> value 8i + k


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = (_nibbles(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


# ----- K-quants (256-weight super-blocks) ------------------------------------------------------

def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).float()).view(n, 16, 1)  # 16 sub-blocks of 16 weights
    ml = (dmin * (sc >> 4).float()).view(n, 16, 1)
    # two 32-byte halves; each half's byte i holds (shift 0, 2, 4, 6) -> values at +0, +32, +64, +96
    q = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 6-bit scales: low nibbles of bytes 0..7 then their high nibbles; 2 high bits from bytes 8..11
    lo = torch.cat([sc[:, :8] & 0x0F, sc[:, :8] >> 4], dim=-1)  # [n, 16]
    hi = _bits(sc[:, 8:12], 2).reshape(n, 16)  # field j of byte i -> scale 4j + i
    scales = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).to(torch.int8)
    qh = _bits(hmask, 1).reshape(n, 16, 16).to(torch.int8)  # bit j of byte i -> value 32j + i
    q = (ql - ((qh ^ 1) << 2)).float()  # the high bit *clear* subtracts 4
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packing -> (scales [n, 8], mins [n, 8]) of 6 bits each."""
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (c >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    q = _bits(b[:, 16:].reshape(n * 4, 32), 4).reshape(n, 8, 32).float()  # 4 chunks of 32 B: low 32 then high 32
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n * 4, 32), 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1).reshape(n, 8, 32)  # bit j of byte i -> sub-block j, value i
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dl = (d * sc).view(n, 16, 1)
    # per 128-value half h: ql byte k (of 64) nibble j -> value 128h + 64j + k; qh byte i field j -> 128h + 32j + i
    lo = _bits(ql.reshape(n * 2, 64), 4).reshape(n, 2, 4, 32)
    hi = _bits(qh.reshape(n * 2, 32), 2).reshape(n, 2, 4, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


# ----- MXFP4 (GGUF block layout) ---------------------------------------------------------------

_E2M1_X2 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """e8m0 byte -> 2^(e-127) / 2 as float32 (ggml_e8m0_to_fp32_half; e < 2 gives subnormals)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    d = _e8m0_half(b[:, :1])  # [n, 1]
    return d * _E2M1_X2[_nibbles(b[:, 1:]).long()]


# ----- the Format objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class GGMLFormat:
    """One ggml block type (see the module docstring)."""

    name: str  # "q4_k"
    type_id: int  # ggml type id (GGMLQuantizationType)
    block_size: int  # weights per block
    type_size: int  # bytes per block
    blocks_fn: Callable[[torch.Tensor], torch.Tensor]  # [n, type_size] uint8 -> [n, block_size] float32

    @property
    def code(self) -> int:
        return 100 + self.type_id

    @property
    def bits(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def ggml_name(self) -> str:
        return GGML_TYPE_NAMES[self.type_id]

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size

    def dequantize(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        data = q.data[:rows]
        if not data.is_contiguous():
            data = data.contiguous()
        blocks = data.reshape(-1, self.type_size)  # [rows * cols / block_size, type_size]
        return self.blocks_fn(blocks).reshape(rows, cols)

    def validate(self, q: QTensor, where: str) -> None:
        rows, cols = q.shape
        if cols % self.block_size:
            raise WeightError(f"{where}: {self.ggml_name} rows of {cols} values are not whole "
                              f"{self.block_size}-value blocks")
        want = self.row_bytes(cols)
        if q.data.dtype != torch.uint8 or q.data.dim() != 2 or q.data.shape[0] < rows or q.data.shape[1] != want:
            raise WeightError(f"{where}: {self.ggml_name} data must be uint8 [{rows}, {want}], got "
                              f"{q.data.dtype} {list(q.data.shape)}")
        if q.scale is not None or q.zero is not None:
            raise WeightError(f"{where}: {self.ggml_name} keeps its scales inline (no scale/zero tensors)")

    def qtensor(self, data: torch.Tensor, cols: int) -> QTensor:
        """Wrap uint8 ``[rows, row_bytes]`` blocks as a QTensor of ``cols`` logical columns."""
        return QTensor(self.name, (data.shape[0], cols), data, block=(1, self.block_size))


_SPECS = (
    ("q4_0", 2, 32, 18, _q4_0), ("q4_1", 3, 32, 20, _q4_1), ("q5_0", 6, 32, 22, _q5_0),
    ("q5_1", 7, 32, 24, _q5_1), ("q8_0", 8, 32, 34, _q8_0),
    ("q2_k", 10, QK_K, 84, _q2_k), ("q3_k", 11, QK_K, 110, _q3_k), ("q4_k", 12, QK_K, 144, _q4_k),
    ("q5_k", 13, QK_K, 176, _q5_k), ("q6_k", 14, QK_K, 210, _q6_k),
    ("ggml_mxfp4", 39, 32, 17, _mxfp4),
)
BY_TYPE: dict[int, GGMLFormat] = {}
for _name, _tid, _bs, _ts, _fn in _SPECS:
    BY_TYPE[_tid] = register(GGMLFormat(_name, _tid, _bs, _ts, _fn))  # type: ignore[arg-type]


def supported_types() -> str:
    return ", ".join(GGML_TYPE_NAMES[t] for t in sorted({*PLAIN_TYPES, *BY_TYPE}))


def type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"ggml type {type_id}")


def check_type(type_id: int, where: str) -> GGMLFormat | torch.dtype:
    """The Format (block types) or torch dtype (F32/F16/BF16) of a ggml type, or one clear WeightError."""
    if type_id in PLAIN_TYPES:
        return PLAIN_TYPES[type_id]
    fmt = BY_TYPE.get(type_id)
    if fmt is None:
        raise WeightError(f"{where}: tensor type {type_name(type_id)} is not supported "
                          f"(supported GGUF tensor types: {supported_types()})")
    return fmt
