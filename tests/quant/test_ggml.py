"""GGUF block types: our torch reference dequantizers equal gguf-py's numpy ones bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetier.errors import WeightError
from moetier.quant import get_format
from moetier.quant.ggml import BY_TYPE, check_type

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, same float32 bits where finite-or-inf, NaN at the same places."""
    if a.shape != b.shape:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    return bool(torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32)))


@pytest.mark.parametrize("type_id", sorted(BY_TYPE))
def test_dequantize_matches_gguf_bit_for_bit(type_id: int) -> None:
    fmt = BY_TYPE[type_id]
    rng = np.random.default_rng(type_id)
    rows, nblk = 5, 3
    raw = rng.integers(0, 256, size=(rows, nblk * fmt.type_size), dtype=np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id))  # [rows, nblk * block_size]
    q = fmt.qtensor(torch.from_numpy(raw.copy()), nblk * fmt.block_size).validate("test")
    got = q.dequantize()
    assert got.dtype == torch.float32
    assert bitwise_equal(got, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)))
    assert get_format(fmt.name) is fmt and fmt.code == 100 + type_id


@pytest.mark.parametrize("type_id", sorted(BY_TYPE))
def test_row_slice_and_finite_values(type_id: int) -> None:
    """Finite scales (realistic blocks): a row slice dequantizes to the same rows."""
    fmt = BY_TYPE[type_id]
    rng = np.random.default_rng(100 + type_id)
    x = rng.standard_normal((8, 2 * fmt.block_size)).astype(np.float32)
    try:
        raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType(type_id))
    except NotImplementedError:  # gguf-py cannot quantize K types: random blocks with sane scales
        raw = rng.integers(0, 256, size=(8, 2 * fmt.type_size), dtype=np.uint8)
        raw.view(np.uint8)[:, :] &= 0x3B  # clears the float16 exponent's top bits: no inf/NaN anywhere
    q = fmt.qtensor(torch.from_numpy(np.ascontiguousarray(raw)), 2 * fmt.block_size)
    full = q.dequantize()
    assert torch.isfinite(full).all()
    assert bitwise_equal(q.row_slice(3, 6).dequantize(), full[3:6])
    ref = torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType(type_id)))
    assert bitwise_equal(full, ref.float())


def test_unsupported_type_is_one_clear_error() -> None:
    with pytest.raises(WeightError, match=r"blk\.0\.ffn_down_exps\.weight.*IQ2_XXS.*supported.*Q4_K"):
        check_type(16, "model.gguf: tensor 'blk.0.ffn_down_exps.weight'")
    assert check_type(30, "x") is torch.bfloat16


def test_validate_rejects_wrong_row_bytes() -> None:
    fmt = BY_TYPE[8]
    q = fmt.qtensor(torch.zeros(2, 33, dtype=torch.uint8), 32)
    with pytest.raises(WeightError, match="Q8_0 data must be uint8"):
        q.validate("f.gguf: tensor 'w'")
