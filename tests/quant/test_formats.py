"""Reference dequantizers equal independent references bit for bit (issue 14, exactness).

FP8: torch.float8_e4m3fn -> float32 times the block scale (explicit per-block loop);
MXFP4: the OCP MX e2m1 table times 2**(e8m0 - 127) in Python floats, nibble order as the
gpt-oss release (and transformers' own gpt-oss dequantizer); compressed-tensors: the
package's own pack-quantized decompressor. Shapes include dims that are not multiples of
the block / group.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetier.errors import WeightError
from moetier.quant import QTensor, fp8, get_format, intgroup, mxfp4

# --------------------------------------------------------------------------------- FP8


def _fp8_reference(data: torch.Tensor, scale_inv: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    out = data.to(torch.float32).clone()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] *= scale_inv[i, j]
    return out


@pytest.mark.parametrize("shape,block", [((576, 300), (128, 128)), ((256, 256), (128, 128)), ((50, 70), (16, 32))])
def test_fp8_equals_reference(shape, block):
    g = torch.Generator().manual_seed(1)
    rows, cols = shape
    data = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    data[(data & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    data = data.view(torch.float8_e4m3fn)
    scale = torch.rand(math.ceil(rows / block[0]), math.ceil(cols / block[1]), generator=g) * 1e-2
    q = QTensor("fp8_e4m3_block", shape, data, scale, block=block).validate("t")
    ref = _fp8_reference(data, scale, *block)
    assert torch.equal(q.dequantize(), ref)
    # a row slice starting inside a block (one expert of a merged tensor; q/k/v splits)
    s = q.row_slice(block[0] // 2 + 3, rows - 5).validate("s")
    assert s.row0 == block[0] // 2 + 3
    assert torch.equal(s.dequantize(), ref[block[0] // 2 + 3 : rows - 5])


def test_fp8_all_codes():
    data = torch.arange(256, dtype=torch.uint8).view(1, 256).view(torch.float8_e4m3fn)
    q = QTensor("fp8_e4m3_block", (1, 256), data, torch.tensor([[0.5, 2.0]]), block=(128, 128))
    ref = torch.cat([data[:, :128].float() * 0.5, data[:, 128:].float() * 2.0], dim=1)
    d = q.dequantize()
    assert torch.equal(torch.isnan(d), torch.isnan(ref)) and int(torch.isnan(d).sum()) == 2  # 0x7F, 0xFF
    assert torch.equal(torch.nan_to_num(d), torch.nan_to_num(ref))


def test_fp8_quantize_round_trip():
    w = torch.randn(200, 130) * 0.05
    q = fp8.quantize(w, (128, 128)).validate("w")
    assert q.scale.shape == (2, 2)
    assert torch.equal(q.dequantize(), _fp8_reference(q.data, q.scale, 128, 128))
    assert (q.dequantize() - w).abs().max() <= w.abs().max() / 448 * 32  # within half an e4m3 step at the top


def test_fp8_validation_names_tensor():
    data = torch.zeros(576, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(WeightError, match=r"^f\.safetensors: tensor 'w'.*shape \[4, 3\].*needs \[5, 3\]"):
        QTensor("fp8_e4m3_block", (576, 300), data, torch.ones(4, 3), block=(128, 128)).validate(
            "f.safetensors: tensor 'w'")
    with pytest.raises(WeightError, match="expected F8_E4M3"):
        QTensor("fp8_e4m3_block", (2, 2), torch.zeros(2, 2), torch.ones(1, 1), block=(128, 128)).validate("w")


# --------------------------------------------------------------------------------- MXFP4

OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [rows, G, 16], scales uint8 [rows, G] -> float32 [rows, 32 G], in Python floats."""
    rows, G, _ = blocks.shape
    out = []
    for r in range(rows):
        row = []
        for gi in range(G):
            e = int(scales[r, gi]) - 127
            for byte in blocks[r, gi].tolist():
                row += [math.ldexp(OCP_E2M1[byte & 0xF], e), math.ldexp(OCP_E2M1[byte >> 4], e)]
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


def test_mxfp4_equals_ocp_table():
    g = torch.Generator().manual_seed(2)
    rows, G = 24, 3
    blocks = torch.randint(0, 256, (rows, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (rows, G), generator=g, dtype=torch.uint8)  # every exponent but NaN
    scales[0, 0], scales[1, 0], scales[2, 0] = 0, 254, 127
    q = QTensor("mxfp4", (rows, 32 * G), blocks.view(rows, -1), scales, block=(1, 32)).validate("t")
    ref = _mxfp4_reference(blocks, scales)
    assert torch.equal(q.dequantize(), ref)
    # gpt-oss interleaved rows as strided views (no copy)
    gate = QTensor("mxfp4", (rows // 2, 32 * G), blocks.view(rows, -1)[0::2], scales[0::2], block=(1, 32))
    assert torch.equal(gate.validate("g").dequantize(), ref[0::2])
    # cols not a multiple of 32: the tail of the last group is padding
    part = QTensor("mxfp4", (rows, 32 * G - 7), blocks.view(rows, -1), scales, block=(1, 32)).validate("p")
    assert torch.equal(part.dequantize(), ref[:, :-7])


def test_mxfp4_scale_255_is_nan():
    q = QTensor("mxfp4", (1, 32), torch.full((1, 16), 0x22, dtype=torch.uint8),
                torch.tensor([[255]], dtype=torch.uint8), block=(1, 32))
    assert torch.isnan(q.dequantize()).all()


def test_mxfp4_equals_transformers_gpt_oss_dequantizer():
    conv = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors
    g = torch.Generator().manual_seed(3)
    E, R, G = 2, 6, 4
    blocks = torch.randint(0, 256, (E, R, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (E, R, G), generator=g, dtype=torch.uint8)
    theirs = conv(blocks, scales, dtype=torch.float32)  # [E, 32 G, R] (the x @ W layout)
    for e in range(E):
        q = QTensor("mxfp4", (R, 32 * G), blocks[e].reshape(R, -1), scales[e], block=(1, 32))
        assert torch.equal(q.dequantize(), theirs[e].T)


def test_mxfp4_quantize():
    w = torch.randn(10, 70)
    q = mxfp4.quantize(w).validate("w")
    d = q.dequantize()
    assert torch.equal(d, _mxfp4_reference(q.data.view(10, 3, 16), q.scale)[:, :70])
    # OCP MX rounding: |error| <= 2 * scale (the e2m1 step at the top is 2; amax / scale < 8 clamps to 6)
    scale = torch.ldexp(torch.ones(10, 3), q.scale.int() - 127).repeat_interleave(32, 1)[:, :70]
    assert ((d - w).abs() <= 2 * scale).all()
    assert (d - w).abs().mean() < 0.1


# --------------------------------------------------------------------------------- compressed-tensors


def _ct_decompress(packed, scale, shape, bits, group, zero_packed=None):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=zero_packed is None, strategy="group",
                            group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    sd = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(shape)}
    if zero_packed is not None:
        sd["weight_zero_point"] = zero_packed
    assert ct is not None
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("bits,group,shape", [(4, 32, (40, 96)), (4, 32, (37, 100)), (8, 64, (33, 130)),
                                              (4, 128, (16, 256))])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int_group_equals_compressed_tensors(bits, group, shape, sym, scale_dtype):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits * 100 + group)
    rows, cols = shape
    groups = math.ceil(cols / group)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vals = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)
    packed = pack_to_int32(vals, bits)  # the package's packing is the on-disk truth
    assert torch.equal(packed, intgroup.pack(vals, bits))
    scale = (torch.rand(rows, groups, generator=g) * 0.1 + 1e-3).to(scale_dtype)
    zero = zp = None
    if not sym:
        zero = torch.randint(lo, hi + 1, (rows, groups), generator=g, dtype=torch.int8)
        zp = pack_to_int32(zero, bits, packed_dim=0)
        assert torch.equal(zp, intgroup.pack_zero(zero, bits))
        assert torch.equal(intgroup.unpack_zero(zp, bits, rows), zero)
    # the package refuses a last partial group: decompress the zero-padded tensor, drop the padding
    padded = torch.zeros(rows, groups * group, dtype=torch.int8)
    padded[:, :cols] = vals
    theirs = _ct_decompress(pack_to_int32(padded, bits), scale, (rows, groups * group), bits, group, zp)
    theirs = theirs[:, :cols]  # computed in the scale dtype
    q = QTensor(f"int{bits}_group", shape, packed, scale, zero, block=(1, group),
                meta={"bits": bits, "symmetric": sym}).validate("t")
    ours = q.dequantize()
    assert ours.dtype == torch.float32 and theirs.dtype == scale_dtype
    # (q - z) * s is exact in float32, so rounding it once to the scale dtype is the package's result
    assert torch.equal(ours.to(scale_dtype), theirs)
    if scale_dtype == torch.float32:
        assert torch.equal(ours, theirs)
    s = q.row_slice(3, rows - 2).validate("s")
    assert torch.equal(s.dequantize(), ours[3 : rows - 2])


def test_int_quantize_error_bound():
    w = torch.randn(20, 100)
    for bits, group in ((4, 32), (8, 128)):
        q = intgroup.quantize(w, bits, group, torch.float32).validate("w")
        step = q.scale.float().repeat_interleave(group, 1)[:, :100]
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
        assert get_format(q.fmt).code == {4: 12, 8: 13}[bits]


def test_int_validation():
    with pytest.raises(WeightError, match=r"^x: weight_scale is torch.float32 \[4, 3\], expected a float \[4, 4\]"):
        QTensor("int4_group", (4, 100), torch.zeros(4, 13, dtype=torch.int32), torch.ones(4, 3),
                block=(1, 32)).validate("x")
    with pytest.raises(WeightError, match="weight_packed is torch.int32 \\[4, 12\\]"):
        QTensor("int4_group", (4, 100), torch.zeros(4, 12, dtype=torch.int32), torch.ones(4, 4),
                block=(1, 32)).validate("x")


def test_format_codes():
    assert {n: get_format(n).code for n in ("fp8_e4m3_block", "mxfp4", "int4_group", "int8_group")} == {
        "fp8_e4m3_block": 10, "mxfp4": 11, "int4_group": 12, "int8_group": 13}
