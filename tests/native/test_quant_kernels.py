"""Native quantized weight kernels: every format, every ISA the CPU runs, against INDEPENDENT
references (GGUF types: ``gguf.quants.dequantize``; FP8: ``torch.float8_e4m3fn``; MXFP4: the
OCP e2m1 table; INT4/INT8 groups: plain torch unpacking written here).

Per format and forced ISA: the reference dequantizer (``mt_dequant_rows``) equals the
reference values bit for bit; ``y = W x`` is within 1e-5 (relative to |W| |x|) of a float64
product; results are bit-identical for 1, 2 and 3 threads; strided rows (garbage between
rows), row offsets into FP8 scale blocks, partial blocks and odd group tails are covered; x is
followed by NaNs and y by sentinels (over-reads poison, over-writes are caught).
"""

from __future__ import annotations

import contextlib
import ctypes
import math

import numpy as np
import pytest
import torch

from moetier import native
from moetier.native.weights import GGML_BLOCKS, describe
from moetier.quant import QTensor

gguf = pytest.importorskip("gguf")


pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py


@contextlib.contextmanager
def forced(isa: str):
    native.set_isa(isa)
    try:
        yield
    finally:
        native.set_isa(None)


def need(isa: str) -> None:
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")


def gemv(lib, q, x: torch.Tensor, nth: int = 1) -> torch.Tensor:
    d = describe(q)
    rows = d.rows
    xbuf = torch.full((x.numel() + 64,), float("nan"))
    xbuf[: x.numel()] = x
    ybuf = torch.full((rows + 16,), float("nan"))
    ybuf[rows:] = 12345.0
    lib.mt_gemv(ctypes.byref(d), None, 0, xbuf.data_ptr(), ybuf.data_ptr(), nth)
    assert (ybuf[rows:] == 12345.0).all(), "wrote past y"
    return ybuf[:rows].clone()


def dequant(lib, q) -> torch.Tensor:
    d = describe(q)
    out = torch.empty(d.rows, d.cols)
    assert lib.mt_dequant_rows(ctypes.byref(d), 0, d.rows, out.data_ptr()) == 0
    return out


def strided(data: torch.Tensor, gen: torch.Generator, pad: int = 13) -> torch.Tensor:
    """``data`` [rows, n] copied into a wider buffer with random garbage between rows."""
    rows, n = data.shape
    if data.dtype == torch.float8_e4m3fn:
        return strided(data.view(torch.uint8), gen, pad).view(torch.float8_e4m3fn)
    if data.dtype == torch.int32:
        buf = torch.randint(-2**31, 2**31 - 1, (rows, n + pad), generator=gen, dtype=torch.int32)
    else:
        buf = torch.randint(0, 256, (rows, n + pad), generator=gen, dtype=torch.uint8).to(data.dtype)
    buf[:, :n] = data
    return buf[:, :n]


def check(lib, q: QTensor, ref: torch.Tensor, isa: str, gen: torch.Generator, threads=(1,)):
    """dequant bit-exact; gemv within 1e-5 of float64; thread counts agree bit for bit."""
    assert ref.dtype == torch.float32 and torch.isfinite(ref).all()
    with forced(isa):
        got = dequant(lib, q)
        assert torch.equal(got, ref), f"dequant differs at {(got != ref).nonzero()[:4].tolist()}"
        x = torch.randn(ref.shape[1], generator=gen)
        ys = [gemv(lib, q, x, n) for n in threads]
    w64 = ref.double()
    want = w64 @ x.double()
    mag = (w64.abs() @ x.double().abs()).clamp_min(1e-30)
    err = ((ys[0].double() - want).abs() / mag).max().item()
    assert err <= 1e-5, (isa, getattr(q, "fmt", q.dtype), tuple(q.shape), err)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


ISAS = native.ISAS


# ----------------------------------------------------------------------------------------
# GGUF block types vs gguf.quants.dequantize

# byte offsets of the float16 fields (d, dmin / m) of each block type
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
              "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "ggml_mxfp4": ()}
GGML_TYPE = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11, "q4_k": 12,
             "q5_k": 13, "q6_k": 14, "ggml_mxfp4": 39}


def ggml_blocks(fmt: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks with finite float16 scales (and sane MXFP4 exponents): uint8 [rows, bytes]."""
    _, bs, nb = GGML_BLOCKS[fmt]
    n = cols // bs
    b = torch.randint(0, 256, (rows, n, nb), generator=gen, dtype=torch.uint8)
    for off in F16_FIELDS[fmt]:
        v = (torch.rand(rows, n, generator=gen) * 0.1 + 0.001).to(torch.float16)
        b[:, :, off : off + 2] = v.view(torch.uint8).view(rows, n, 2)
    if fmt == "ggml_mxfp4":
        b[:, :, 0] = torch.randint(110, 140, (rows, n), generator=gen, dtype=torch.uint8)
    return b.view(rows, n * nb)


def ggml_ref(fmt: str, data: torch.Tensor, cols: int) -> torch.Tensor:
    arr = np.ascontiguousarray(data.numpy())
    out = gguf.quants.dequantize(arr, gguf.GGMLQuantizationType(GGML_TYPE[fmt]))
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(data.shape[0], cols).copy())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(GGML_BLOCKS))
def test_ggml_formats(lib, fmt, isa):
    need(isa)
    _, bs, _ = GGML_BLOCKS[fmt]
    gen = torch.Generator().manual_seed(GGML_TYPE[fmt])
    for rows, nblk in ((1, 1), (5, 3), (17, 2)):
        cols = bs * nblk
        data = ggml_blocks(fmt, rows, cols, gen)
        ref = ggml_ref(fmt, data, cols)
        check(lib, QTensor(fmt, (rows, cols), data, block=(1, bs)), ref, isa, gen)
        check(lib, QTensor(fmt, (rows, cols), strided(data, gen), block=(1, bs)), ref, isa, gen)
    rows, cols = 301, bs * (40 if bs == 32 else 5)  # big enough to split over threads
    data = ggml_blocks(fmt, rows, cols, gen)
    check(lib, QTensor(fmt, (rows, cols), data, block=(1, bs)), ggml_ref(fmt, data, cols), isa, gen, (1, 2, 3))


# ----------------------------------------------------------------------------------------
# FP8 e4m3 block-scaled vs torch.float8_e4m3fn


def fp8_case(rows, cols, block, gen, sdtype=torch.float32):
    codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes (checkpoints carry none)
    data = codes.view(torch.float8_e4m3fn)
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = (torch.rand(grid, generator=gen) * 0.02 + 1e-4).to(sdtype)
    return data, scale


def fp8_ref(data, scale, block, row0=0):
    s = scale.float().repeat_interleave(block[0], 0)[row0 : row0 + data.shape[0]]
    s = s.repeat_interleave(block[1], 1)[:, : data.shape[1]]
    return data.float() * s


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_fp8_block(lib, isa, sdtype):
    need(isa)
    gen = torch.Generator().manual_seed(10)
    for rows, cols, block in ((3, 100, (128, 128)), (130, 300, (128, 128)), (9, 77, (4, 16)), (5, 33, (2, 24)),
                              (2, 1, (1, 8))):
        data, scale = fp8_case(rows, cols, block, gen, sdtype)
        ref = fp8_ref(data, scale, block)
        q = QTensor("fp8_e4m3_block", (rows, cols), data, scale, block=block)
        check(lib, q, ref, isa, gen)
        check(lib, QTensor("fp8_e4m3_block", (rows, cols), strided(data, gen), scale, block=block), ref, isa, gen)
        if rows > 3:  # a row slice starting inside a block row: row0 > 0
            sl = q.row_slice(3, rows - 1)
            assert sl.row0 == 3 % block[0]
            check(lib, sl, ref[3 : rows - 1], isa, gen)
    data, scale = fp8_case(257, 520, (128, 128), gen, sdtype)
    q = QTensor("fp8_e4m3_block", (257, 520), data, scale, block=(128, 128))
    check(lib, q, fp8_ref(data, scale, (128, 128)), isa, gen, (1, 2, 3))


def test_fp8_subnormals_and_extremes(lib):
    """Every non-NaN e4m3 code (subnormals, +-0, +-448) decodes exactly on every ISA."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8).view(1, -1)
    data = codes.view(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5, 3.0]])
    block = (1, 128)
    ref = fp8_ref(data, scale, block)
    gen = torch.Generator().manual_seed(1)
    for isa in native.isas_supported():
        check(lib, QTensor("fp8_e4m3_block", tuple(data.shape), data, scale, block=block), ref, isa, gen)


def test_fp8_subnormal_codes_under_daz(lib):
    """The AVX-512 fp8 kernel reads e4m3 subnormal codes as float32 subnormals: with MXCSR.DAZ set
    on the calling thread (torch.set_flush_denormal) they would read as zero, so the AVX2 (F16C)
    kernel runs there instead; the product stays exact."""
    need("avx512")
    codes = torch.tensor([[c for c in range(1, 8)] + [0x80 | c for c in range(1, 8)] + [0x38, 0xB8]] * 2,
                         dtype=torch.uint8)  # the 14 subnormal codes and +-1
    data = codes.view(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5]])
    block = (2, 128)
    q = QTensor("fp8_e4m3_block", tuple(data.shape), data, scale, block=block)
    ref = fp8_ref(data, scale, block)
    x = torch.linspace(1.0, 2.0, data.shape[1])
    want = ref.double() @ x.double()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no DAZ / FTZ")
    try:
        with forced("avx512"):
            got = gemv(lib, q, x, 1)  # one thread: the caller's MXCSR
    finally:
        torch.set_flush_denormal(False)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0), (got, want)


# ----------------------------------------------------------------------------------------
# MXFP4 (gpt-oss layout) vs the OCP e2m1 table

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_ref(data: torch.Tensor, scale: torch.Tensor, cols: int) -> torch.Tensor:
    rows = data.shape[0]
    out = torch.empty(rows, cols, dtype=torch.float64)
    d, s = data.tolist(), scale.tolist()
    for r in range(rows):
        for c in range(cols):
            code = (d[r][c // 2] >> (4 * (c % 2))) & 15
            out[r, c] = E2M1[code] * 2.0 ** (s[r][c // 32] - 127)
    return out.float()


@pytest.mark.parametrize("isa", ISAS)
def test_mxfp4(lib, isa):
    need(isa)
    gen = torch.Generator().manual_seed(11)
    for rows, cols in ((1, 32), (4, 64), (7, 90), (3, 17), (33, 320)):
        groups = math.ceil(cols / 32)
        data = torch.randint(0, 256, (rows, 16 * groups), generator=gen, dtype=torch.uint8)
        scale = torch.randint(100, 150, (rows, groups), generator=gen, dtype=torch.uint8)
        ref = mxfp4_ref(data, scale, cols)
        check(lib, QTensor("mxfp4", (rows, cols), data, scale, block=(1, 32)), ref, isa, gen)
        # gpt-oss interleaved gate/up rows: every other row of a merged tensor, no copy
        both = torch.stack([data, torch.randint(0, 256, data.shape, generator=gen, dtype=torch.uint8)], 1)
        sboth = torch.stack([scale, torch.randint(100, 150, scale.shape, generator=gen, dtype=torch.uint8)], 1)
        gate = QTensor("mxfp4", (rows, cols), both.view(2 * rows, -1)[0::2], sboth.view(2 * rows, -1)[0::2],
                       block=(1, 32))
        check(lib, gate, ref, isa, gen)
    rows, cols = 300, 640
    data = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
    scale = torch.randint(100, 150, (rows, cols // 32), generator=gen, dtype=torch.uint8)
    check(lib, QTensor("mxfp4", (rows, cols), data, scale, block=(1, 32)), mxfp4_ref(data, scale, cols), isa, gen,
          (1, 2, 3))


# ----------------------------------------------------------------------------------------
# INT4 / INT8 groups (compressed-tensors pack-quantized) vs plain torch unpacking


def int_case(rows, cols, bits, g, gen, sdtype, zero):
    per = 32 // bits
    words = math.ceil(cols / per)
    u = torch.randint(0, 1 << bits, (rows, words * per), generator=gen, dtype=torch.int64)
    packed = (u.view(rows, words, per) << (torch.arange(per) * bits)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    groups = math.ceil(cols / g)
    scale = (torch.rand(rows, groups, generator=gen) * 0.05 + 0.001).to(sdtype)
    z = torch.randint(-3, 4, (rows, groups), generator=gen, dtype=torch.int8) if zero else None
    v = u[:, :cols] - (1 << (bits - 1))  # signed values
    if z is not None:
        v = v - z.long().repeat_interleave(g, 1)[:, :cols]
    ref = v.float() * scale.float().repeat_interleave(g, 1)[:, :cols]
    return packed, scale, z, ref


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
def test_int_groups(lib, isa, bits):
    need(isa)
    gen = torch.Generator().manual_seed(bits)
    fmt = f"int{bits}_group"
    for rows, cols, g, sdtype, zero in ((1, 32, 32, torch.bfloat16, False), (5, 100, 32, torch.float32, True),
                                        (3, 129, 64, torch.float16, False), (6, 70, 6, torch.bfloat16, True),
                                        (4, 7, 128, torch.float32, True), (2, 300, 300, torch.bfloat16, False),
                                        (3, 300, 32, torch.bfloat16, False), (3, 200, 96, torch.bfloat16, True)):
        packed, scale, z, ref = int_case(rows, cols, bits, g, gen, sdtype, zero)
        q = QTensor(fmt, (rows, cols), packed, scale, z, block=(1, g))
        check(lib, q, ref, isa, gen)
        check(lib, QTensor(fmt, (rows, cols), strided(packed, gen), scale, z, block=(1, g)), ref, isa, gen)
    packed, scale, z, ref = int_case(300, 520, bits, 128, gen, torch.bfloat16, True)
    check(lib, QTensor(fmt, (300, 520), packed, scale, z, block=(1, 128)), ref, isa, gen, (1, 2, 3))


# ----------------------------------------------------------------------------------------
# the avx512vnni kernels: x as int8 digits (csrc/simd.h), integer dot products

# the formats with avx512vnni kernels; every other one runs its avx512 kernels at that level
VNNI_FORMATS = ("int4_group", "int8_group", "q4_k", "q5_0", "q6_k", "mxfp4", "ggml_mxfp4")


def test_vnni_dispatch(lib):
    """Which kernels run at avx512vnni: the digit kernels of VNNI_FORMATS, the avx512 ones of
    the rest (their rows, tiles and prepared x together)."""
    from moetier.native.weights import CODES, PLAIN_CODES

    vnni, avx512 = ISAS.index("avx512vnni"), ISAS.index("avx512")
    for name, code in [*CODES.items(), *((str(k), v) for k, v in PLAIN_CODES.items())]:
        assert lib.mt_fmt_isa(code, vnni) == (vnni if name in VNNI_FORMATS else avx512), name
        assert lib.mt_fmt_isa(code, avx512) == avx512, name


def heavy_x(n: int, gen: torch.Generator) -> torch.Tensor:
    """x with a wide dynamic range: log-normal magnitudes (outliers 1000x the typical value next
    to tiny ones in the same block), an all-zero stretch and a few exact zeros."""
    x = torch.randn(n, generator=gen) * torch.exp(2.5 * torch.randn(n, generator=gen))
    x[n // 2 : n // 2 + 64] = 0.0
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("isa", ISAS)
def test_quantized_gemv_heavy_tailed_x(lib, isa):
    """y = W x for x with outliers within 1e-5 of float64 (relative to |W| |x|) on every ISA: the
    digit kernels keep float32-grade activations (a kernel that dropped a digit of x errs by
    ~1e-4 here), thread counts agree bit for bit."""
    need(isa)
    gen = torch.Generator().manual_seed(21)
    cases = []
    for fmt, cols in (("q4_k", 1024), ("q8_0", 1024), ("q6_k", 1024), ("q5_0", 1024), ("q5_0", 416)):
        data = ggml_blocks(fmt, 37, cols, gen)
        cases.append((QTensor(fmt, (37, cols), data, block=(1, GGML_BLOCKS[fmt][1])), ggml_ref(fmt, data, cols)))
    for bits, g, zero, cols in ((4, 32, False, 1024), (4, 128, True, 1000), (4, 64, True, 520), (8, 128, False, 1024),
                                (8, 256, True, 1000), (8, 1024, False, 1024), (8, 128, True, 200)):
        packed, scale, z, ref = int_case(37, cols, bits, g, gen, torch.bfloat16, zero)
        cases.append((QTensor(f"int{bits}_group", (37, cols), packed, scale, z, block=(1, g)), ref))
    for q, ref in cases:
        x = heavy_x(ref.shape[1], gen)
        with forced(isa):
            ys = [gemv(lib, q, x, n) for n in (1, 2, 3)]
        w64 = ref.double()
        err = ((ys[0].double() - w64 @ x.double()).abs() / (w64.abs() @ x.double().abs()).clamp_min(1e-30)).max().item()
        assert err <= 1e-5, (isa, q.fmt, tuple(q.shape), err)
        assert all(torch.equal(y, ys[0]) for y in ys[1:])


def test_vnni_nonfinite_x(lib):
    """A NaN in x gives NaN rows at avx512vnni as at avx512 (the digits' block scale carries it)."""
    need("avx512vnni")
    gen = torch.Generator().manual_seed(22)
    packed, scale, z, ref = int_case(3, 256, 4, 32, gen, torch.float32, False)
    packed8, scale8, z8, _ = int_case(3, 256, 8, 128, gen, torch.float32, True)
    data = ggml_blocks("q4_k", 3, 256, gen)
    for q in (QTensor("int4_group", (3, 256), packed, scale, z, block=(1, 32)),
              QTensor("int8_group", (3, 256), packed8, scale8, z8, block=(1, 128)),
              QTensor("q4_k", (3, 256), data, block=(1, 256))):
        x = torch.randn(256, generator=gen)
        x[100] = float("nan")
        with forced("avx512vnni"):
            assert torch.isnan(gemv(lib, q, x)).all(), q.fmt


# ----------------------------------------------------------------------------------------
# float16 and descriptor validation


@pytest.mark.parametrize("isa", ISAS)
def test_f16(lib, isa):
    need(isa)
    gen = torch.Generator().manual_seed(16)
    for rows, cols in ((1, 1), (3, 17), (9, 100), (300, 385)):
        w = torch.randn(rows, cols, generator=gen).to(torch.float16)
        check(lib, w, w.float(), isa, gen, (1, 2) if rows > 100 else (1,))


def test_describe_rejects_bad_layouts(lib):
    from moetier.errors import WeightError

    with pytest.raises(WeightError, match="w: q4_k rows of 100 values need a multiple of 256"):
        describe(QTensor("q4_k", (2, 100), torch.zeros(2, 144, dtype=torch.uint8), block=(1, 256)), what="w")
    with pytest.raises(WeightError, match="w: int4_group block \\[1, 7\\] is not supported natively"):
        describe(QTensor("int4_group", (2, 14), torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2),
                         block=(1, 7)), what="w")
    with pytest.raises(WeightError, match="scale \\[1, 1\\] is smaller than"):
        describe(QTensor("fp8_e4m3_block", (2, 200), torch.zeros(2, 200, dtype=torch.float8_e4m3fn),
                         torch.ones(1, 1), block=(128, 128)), what="w")
    with pytest.raises(WeightError, match="the native kernels do not read format 'iq2_xs'"):
        describe(QTensor("iq2_xs", (2, 256), torch.zeros(2, 66, dtype=torch.uint8)), what="w")


def test_embed_rows_of_any_format(lib):
    """mt_embed copies one row of a (quantized) embedding table: the reference values."""
    gen = torch.Generator().manual_seed(5)
    data = ggml_blocks("q6_k", 7, 512, gen)
    ref = ggml_ref("q6_k", data, 512)
    d = describe(QTensor("q6_k", (7, 512), data, block=(1, 256)))
    for tok in (0, 3, 6):
        x = torch.full((512 + 8,), 7.0)
        lib.mt_embed(ctypes.byref(d), tok, x.data_ptr())
        assert torch.equal(x[:512], ref[tok]) and (x[512:] == 7.0).all()
    w = torch.randn(5, 33, generator=gen).to(torch.bfloat16)
    x = torch.empty(33)
    lib.mt_embed(ctypes.byref(describe(w)), 4, x.data_ptr())
    assert torch.equal(x, w[4].float())
