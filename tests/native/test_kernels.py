"""Native weight kernels per instruction set: every ISA the CPU runs (forced through
``native.set_isa`` / ``MOETIER_ISA``) against a float64 reference, thread-count independence per
ISA, strided rows, and whole-model decode under each forced ISA.
"""

from __future__ import annotations

import contextlib
import ctypes
import json

import pytest
import torch

import moetier
from moetier import native
from moetier.native.weights import describe
from tests.helpers import make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("_native_on")  # lib: tests/native/conftest.py


ISAS = native.ISAS


@contextlib.contextmanager
def forced(isa: str):
    native.set_isa(isa)
    try:
        assert native.isa() == isa
        yield
    finally:
        native.set_isa(None)


def need(isa: str) -> None:
    if isa not in native.isas_supported():
        pytest.skip(f"this CPU does not run {isa}")


def run_gemv(lib, w, x: torch.Tensor, nth: int = 1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = w @ x through mt_gemv; sentinels past y catch out-of-bounds writes."""
    d = describe(w)
    rows = d.rows
    ybuf = torch.full((rows + 16,), float("nan"))
    ybuf[rows:] = 12345.0
    bdt = {None: 0, torch.float32: 0, torch.bfloat16: 1}[None if bias is None else bias.dtype]
    lib.mt_gemv(ctypes.byref(d), None if bias is None else bias.data_ptr(), bdt, x.data_ptr(), ybuf.data_ptr(), nth)
    assert (ybuf[rows:] == 12345.0).all(), "wrote past y"
    return ybuf[:rows].clone()


def product_input(x: torch.Tensor, wdtype: torch.dtype) -> torch.Tensor:
    """x as a product with weights of ``wdtype`` takes it: rounded to bf16 for bf16 weights."""
    return x.bfloat16().float() if wdtype == torch.bfloat16 else x


def rel_err(y: torch.Tensor, W64: torch.Tensor, x: torch.Tensor) -> float:
    """max |y - W x| / (|W| |x|) against float64."""
    ref = W64 @ x.double()
    mag = (W64.abs() @ x.double().abs()).clamp_min(1e-300)
    return ((y.double() - ref).abs() / mag).max().item()


def poisoned(W: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """W [rows, cols] in a buffer followed by NaNs (over-reads poison the result)."""
    rows, cols = W.shape
    buf = torch.full((rows * cols + pad,), float("nan"), dtype=W.dtype)
    buf[: rows * cols] = W.reshape(-1)
    return buf[: rows * cols].view(rows, cols)


def padded_x(x: torch.Tensor, pad: int = 64) -> torch.Tensor:
    buf = torch.full((x.numel() + pad,), float("nan"))
    buf[: x.numel()] = x
    return buf[: x.numel()]


COLS = (1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 384, 1031)


# ----------------------------------------------------------------------------------------
# plain float weights


def test_isa_names(lib):
    sup = native.isas_supported()
    assert sup[0] == "scalar" and native.isa() == sup[-1]  # the best one by default
    with pytest.raises(ValueError, match="not supported"):
        native.set_isa("sse9")
    assert native.isa() == sup[-1]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_gemv_per_isa(lib, isa, dtype):
    need(isa)
    gen = torch.Generator().manual_seed(11)
    with forced(isa):
        for cols in COLS:
            for rows in (1, 3, 8, 13):
                W = poisoned(torch.randn(rows, cols, generator=gen).to(dtype))
                x = padded_x(torch.randn(cols, generator=gen))
                y = run_gemv(lib, W, x)
                assert torch.isfinite(y).all(), (isa, rows, cols)
                assert rel_err(y, W.double(), product_input(x, dtype)) <= 1e-5, (isa, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_isas_agree(lib, dtype):
    """Every ISA gives the reference result within float rounding (they sum in different orders)."""
    gen = torch.Generator().manual_seed(12)
    W = torch.randn(37, 1000, generator=gen).to(dtype)
    x = torch.randn(1000, generator=gen)
    mag = W.double().abs() @ product_input(x, dtype).double().abs()
    ys = {}
    for isa in native.isas_supported():
        with forced(isa):
            ys[isa] = run_gemv(lib, W, x)
    for isa, y in ys.items():
        assert ((y.double() - ys["scalar"].double()).abs() / mag).max().item() <= 2e-6, isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_threads_and_strided_rows(lib, isa, dtype):
    """Big enough to split over threads: same bits for 1, 2 and 3 threads; a strided row view
    (every other row of a wider buffer) gives the same bits as a contiguous copy."""
    need(isa)
    gen = torch.Generator().manual_seed(13)
    big = torch.randn(2 * 301, 385 + 7, generator=gen).to(dtype)
    W = big[1::2, 3:388]  # rows 2 apart, columns offset: stride(0) = 2 * 392 elements
    assert not W.is_contiguous() and W.stride(1) == 1
    x = torch.randn(385, generator=gen)
    b = torch.randn(301, generator=gen).to(dtype)
    with forced(isa):
        ys = [run_gemv(lib, W, x, nth, b) for nth in (1, 2, 3)]
        yc = run_gemv(lib, W.contiguous(), x, 1, b)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    assert torch.equal(ys[0], yc)
    xr = product_input(x, dtype).double()
    ref = W.double() @ xr + b.double()
    mag = W.double().abs() @ xr.abs() + b.double().abs()
    assert ((ys[0].double() - ref).abs() / mag).max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_scalar_is_the_exact_reference(lib, dtype):
    """The scalar kernel is bit-exact with its definition (8 lane sums, float32 products and adds
    without FMA, combined pairwise; bf16 weights take x rounded to bf16) emulated in numpy: the
    compiler did not vectorise or contract it into something else."""
    import numpy as np

    gen = torch.Generator().manual_seed(14)
    for cols in (5, 64, 203):
        W = torch.randn(9, cols, generator=gen).to(dtype)
        x = torch.randn(cols, generator=gen)
        w32, x32 = W.float().numpy(), product_input(x, dtype).numpy()
        acc = np.zeros((9, 8), dtype=np.float32)
        for c in range(cols):
            acc[:, c & 7] = acc[:, c & 7] + w32[:, c] * x32[c]
        a = acc
        want = ((a[:, 0] + a[:, 1]) + (a[:, 2] + a[:, 3])) + ((a[:, 4] + a[:, 5]) + (a[:, 6] + a[:, 7]))
        with forced("scalar"):
            got = run_gemv(lib, W, x)
        assert torch.equal(got, torch.from_numpy(want)), cols


def test_bf16_dot_is_exactly_vdpbf16ps(lib):
    """The avx512bf16 row kernel is bit-exact with its definition emulated in numpy: x rounded to
    bf16 (nearest even); per 32-column chunk, float32 lane i adds the product of column 2i + 1 and
    then that of column 2i (each product exact); 64-column steps alternate accumulators a0 / a1,
    the rest and the masked tail go to a0; then sum(a0 + a1) as halves 8 + 8, 4 + 4, 2 + 2, 1 + 1.
    This pins the instruction's order on the CPU the tests run on (Intel documents it; AMD
    implements the same instruction)."""
    import numpy as np

    need("avx512bf16")
    gen = torch.Generator().manual_seed(15)
    for cols in (2, 33, 64, 96, 130, 1000):
        W = torch.randn(7, cols, generator=gen).bfloat16()
        x = torch.randn(cols, generator=gen)
        cpad = (cols + 31) // 32 * 32
        w = np.zeros((7, cpad), np.float32)
        w[:, :cols] = W.float().numpy()
        xr = np.zeros(cpad, np.float32)
        xr[:cols] = x.bfloat16().float().numpy()
        acc = np.zeros((7, 2, 16), np.float32)
        cfull = cols & ~31
        for c in range(0, cpad, 32):
            k = 1 if (c % 64 == 32 and c + 32 <= cfull and (c - 32) + 64 <= cfull) else 0
            ev, od = w[:, c:c + 32:2] * xr[c:c + 32:2], w[:, c + 1:c + 32:2] * xr[c + 1:c + 32:2]
            acc[:, k] = (acc[:, k] + od) + ev
        v = acc[:, 0] + acc[:, 1]
        v = v[:, :8] + v[:, 8:]
        v = v[:, :4] + v[:, 4:]
        v = v[:, :2] + v[:, 2:]
        want = v[:, 0] + v[:, 1]
        with forced("avx512bf16"):
            got = run_gemv(lib, W, x)
        assert torch.equal(got, torch.from_numpy(want)), (cols, (got - torch.from_numpy(want)).abs().max())


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_rounds_x_to_nearest_even(lib, isa):
    """Each ISA's preparation of x (scalar, or the avx512bf16 level's vector one) rounds to bf16
    as torch does: ties to even, both signs, the largest and small normal values, and a NaN stays
    NaN. One-hot rows pick each rounded value out exactly (every other product is 0)."""
    need(isa)
    one = 1.0 + 2.0**-8  # halfway between bf16 1 and 1 + 2^-7: even is 1
    vals = [one, 1.0 + 3 * 2.0**-8, -one, -(1.0 + 3 * 2.0**-8), 3.0e38, -3.38e38, 2.0**-120 * one, 0.0, -0.0]
    gen = torch.Generator().manual_seed(17)
    for cols in (9, 47, 100):  # tails of every width
        x = torch.cat([torch.tensor(vals), torch.randn(cols, generator=gen) * 7])[:cols]
        W = torch.eye(cols).bfloat16()
        with forced(isa):
            got = run_gemv(lib, W, x)
        want = x.bfloat16().float()
        assert torch.equal(got, want), (isa, cols, (got - want).abs().max())
        x[cols // 2] = float("nan")
        with forced(isa):
            assert torch.isnan(run_gemv(lib, W, x)).all()


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_f32x_keeps_float32_activations(lib, isa):
    """bf16 weights described with ``x_f32`` (a float32 model's bf16 parts, e.g. a GGUF tensor
    read in place) multiply x unrounded: the float64 reference on x itself within 1e-5, where the
    bf16 rule (x rounded) is ~1e-3 off it on these rows."""
    need(isa)
    gen = torch.Generator().manual_seed(16)
    W = torch.randn(21, 777, generator=gen).bfloat16()
    x = torch.randn(777, generator=gen)
    with forced(isa):
        d = describe(W, x_f32=True)
        y = torch.empty(21)
        lib.mt_gemv(ctypes.byref(d), None, 0, x.data_ptr(), y.data_ptr(), 1)
        rounded = run_gemv(lib, W, x)
    assert d.fmt == 3 and rel_err(y, W.double(), x) <= 1e-5
    assert rel_err(rounded, W.double(), x) > 1e-4  # the other rule, told apart
    assert rel_err(rounded, W.double(), product_input(x, torch.bfloat16)) <= 1e-5


def test_describe_rejects(lib):
    from moetier.errors import WeightError

    with pytest.raises(WeightError, match="w1: dtype torch.int32"):
        describe(torch.zeros(2, 2, dtype=torch.int32), what="w1")
    with pytest.raises(WeightError, match="w2: native kernels need 2-D weights with contiguous rows"):
        describe(torch.zeros(4, 3).t(), what="w2")


# ----------------------------------------------------------------------------------------
# ISA selection from the environment, the run report, whole-model decode per ISA


def _reload(monkeypatch):
    """Forget the loaded library (the same cached .so is loaded again: no rebuild)."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)


def test_env_forces_isa(lib, monkeypatch):
    try:
        _reload(monkeypatch)
        monkeypatch.setenv("MOETIER_ISA", "scalar")
        assert native.library() is not None and native.isa() == "scalar"
        _reload(monkeypatch)
        monkeypatch.setenv("MOETIER_ISA", "avx9000")
        assert native.library() is None
        reason = native.unavailable_reason()
        assert reason.startswith("MOETIER_ISA=avx9000: not an instruction set this CPU runs") and "scalar" in reason
    finally:
        lib.mt_set_isa(-1)  # the same library handle: back to the best ISA


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("wide"), "qwen3_moe", tokenizer=False, hidden_size=128, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, moe_intermediate_size=128, num_experts_per_tok=4, vocab_size=512,
        intermediate_size=256, mlp_only_layers=[1])


def _decode(model, n=6):
    seq = model.new_sequence()
    out = [model.step([(seq, [5, 17, 42, 7])])[0]]
    for t in (9, 300, 2, 77, 128)[:n]:
        out.append(model.step([(seq, [t])])[0])
    return torch.stack(out)


@pytest.mark.parametrize("isa", ISAS)
def test_decode_per_isa(lib, wide, isa):
    """float32 decode under each forced ISA matches the torch path; threads do not change bits."""
    need(isa)
    ref = _decode(moetier.load(wide, tokenizer=False, native=False))
    m = moetier.load(wide, tokenizer=False)
    assert m.native_reason is None
    with forced(isa):
        got = _decode(m)
        with torch.no_grad():
            n0 = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                got1 = _decode(m)
            finally:
                torch.set_num_threads(n0)
    assert ((got - ref).abs() <= 1e-5 + 1e-6 * ref.abs()).all(), (got - ref).abs().max().item()
    assert torch.equal(got, got1)


def test_run_json_reports_isa(lib, tmp_path, capsys):
    from moetier.cli import main

    ck = make_tiny_checkpoint(tmp_path, "qwen3_moe")  # with a tokenizer
    assert main(["run", str(ck), "--prompt", "hello", "--max-tokens", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["decode_path"] == "native" and rep["native_isa"] == native.isa() == native.isas_supported()[-1]
    assert main(["run", str(ck), "--prompt", "hello", "--max-tokens", "3", "--json", "--no-native"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["decode_path"] == "torch" and rep["native_isa"] is None


# ----------------------------------------------------------------------------------------
# kernel rates (the planner's per-format measurement): shape of the result, not speed


def test_kernel_rates(lib):
    from moetier.native.rates import FORMATS, measure, measure_all, random_weight

    for fmt in FORMATS:  # every format's random weight is valid and finite when dequantized
        w = random_weight(fmt, 3, 256)
        d = describe(w)
        out = torch.empty(3, 256)
        assert lib.mt_dequant_rows(ctypes.byref(d), 0, 3, out.data_ptr()) == 0
        assert torch.isfinite(out).all(), fmt
    r = measure("q4_k", "scalar", threads=2, rows=64, cols=512, repeats=2, seconds=0.01)
    assert r.isa == "scalar" and r.threads == 2 and r.seconds > 0 and r.nbytes == 64 * 2 * 144
    assert r.weights_per_s == pytest.approx(64 * 512 / r.seconds) and native.isa() == native.isas_supported()[-1]
    rates = measure_all(rows=16, cols=256, formats=("bf16", "mxfp4"), seconds=0.01)
    assert set(rates) == {"bf16", "mxfp4"} and all(v.bytes_per_s > 0 for v in rates.values())


def test_bench_kernels_script(lib, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "k.json"
    assert mod.main(["--rows", "8", "--cols", "256", "--threads", "1,2", "--formats", "q8_0,bf16", "--isas", "scalar",
                     "--seconds", "0.01", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["format"], r["isa"], r["threads"]) for r in rows] == [
        ("q8_0", "scalar", 1), ("q8_0", "scalar", 2), ("bf16", "scalar", 1), ("bf16", "scalar", 2)]
    assert "| q8_0 | scalar | 1 |" in capsys.readouterr().out
