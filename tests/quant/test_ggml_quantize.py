"""moetier's ggml quantizers (quant/ggml_quantize.py) against llama.cpp's, and the formats' rounding.

The oracle ``tests/data/ggml_quant_ref.npz`` holds float rows and the blocks llama.cpp's own
``ggml_quantize_chunk`` (llama-cpp-python 0.3.36's libggml-base, no importance matrix) made of
them: ``scripts/make_ggml_quant_ref.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moetier.errors import ConfigError
from moetier.quant.ggml import BY_TYPE, _k_scale_min
from moetier.quant.ggml_quantize import TYPE_IDS, quantizable, quantize, tensor_type

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install moetier[gguf]) is not installed")

REF = Path(__file__).resolve().parent.parent / "data" / "ggml_quant_ref.npz"
TYPES = ["Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def dequant(q: np.ndarray, t: str) -> np.ndarray:
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType[t]).astype(np.float32)


@pytest.mark.parametrize("t", TYPES)
def test_blocks_equal_llama_cpp(t: str) -> None:
    ref = np.load(REF)
    x, want = ref["x"], ref[t]
    got = quantize(x, t)
    assert got.shape == want.shape and got.dtype == np.uint8
    ts = BY_TYPE[TYPE_IDS[t]].type_size
    g, w = got.reshape(-1, ts).copy(), want.reshape(-1, ts).copy()
    if t in ("Q5_0", "Q5_1"):
        # gguf-py's quantizers (used for these) may store a zero d / m as -0.0 where llama.cpp has
        # +0.0 (blocks of zeros, a min of -0.0): the same values; compare with zeros made positive
        for a in (g, w):
            for f in range(2 if t == "Q5_1" else 1):
                h = a[:, 2 * f:2 * f + 2].view(np.uint16)
                h[h == 0x8000] = 0
    same = (g == w).all(axis=1)
    assert same.all(), f"{(~same).sum()} of {same.size} {t} blocks differ from llama.cpp's"
    np.testing.assert_array_equal(dequant(got, t), dequant(want, t))


def test_moetier_reader_dequantizes_written_blocks_bit_for_bit() -> None:
    x = np.load(REF)["x"]
    for t in TYPES:
        q = quantize(x, t)
        fmt = BY_TYPE[TYPE_IDS[t]]
        ours = fmt.qtensor(torch.from_numpy(q), x.shape[1]).dequantize().numpy()
        assert np.array_equal(ours.view(np.int32), dequant(q, t).view(np.int32)), t


def _grid_distance(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """|x - nearest point of {offset + k * scale, k = lo..hi}| per value (x [n, g], scale/offset [n, 1])."""
    k = np.clip(np.rint((x - offset) / np.where(scale == 0, 1, scale)), lo, hi)
    return np.abs(x - (offset + k * scale))


@pytest.mark.parametrize("t", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_error_within_the_formats_rounding(t: str) -> None:
    """Each value dequantizes to the nearest point of its sub-block's grid (K types: ``d * sc * q
    - dmin * m``, q in 0..nmax, or ``d * sc * q``, q in -32..31), up to float32 rounding; Q8_0:
    ``|x - d q| <= d' / 2 + 127 |d' - d|`` with ``d' = amax / 127`` (the scale it rounds
    with) and ``d`` the stored float16 scale."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal((6, 1024)), rng.standard_t(3, (2, 1024)) * 0.05]).astype(np.float32)
    q = quantize(x, t)
    err = np.abs(dequant(q, t).reshape(x.shape) - x)
    n = x.size // 256
    b = torch.from_numpy(q.reshape(-1, BY_TYPE[TYPE_IDS[t]].type_size))
    if t == "Q8_0":
        d = b[:, :2].contiguous().view(torch.float16).float().numpy()  # [blocks, 1]
        d_exact = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        bound = d_exact / 2 + 127 * np.abs(d_exact - d)
        assert (err.reshape(-1, 32) <= bound * (1 + 1e-6)).all()
        return
    xs = x.reshape(n, -1, 32 if t != "Q6_K" else 16)
    if t == "Q6_K":
        d = b[:, 208:210].contiguous().view(torch.float16).float().numpy()[:, :, None]
        sc = b[:, 192:208].contiguous().view(torch.int8).float().numpy()[:, :, None]
        dist = _grid_distance(xs, d * sc, np.zeros_like(d * sc), -32, 31)
    else:
        d = b[:, 0:2].contiguous().view(torch.float16).float().numpy()[:, :, None]
        dmin = b[:, 2:4].contiguous().view(torch.float16).float().numpy()[:, :, None]
        sc, mn = (v.float().numpy()[:, :, None] for v in _k_scale_min(b[:, 4:16]))
        dist = _grid_distance(xs, d * sc, -(dmin * mn), 0, 15 if t == "Q4_K" else 31)
    step = np.abs(d * sc)
    assert (err.reshape(dist.shape) <= dist + 1e-6 * (step + np.abs(xs))).all()
    rel_rmse = np.sqrt((err ** 2).mean() / (x ** 2).mean())
    assert rel_rmse < {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.022}[t]


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ConfigError, match="not whole 256-value blocks"):
        quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ConfigError, match="expected one of"):
        quantize(np.zeros((2, 256), np.float32), "IQ4_XS")


def test_tensor_type_follows_llama_cpp_recipes() -> None:
    n = 48  # use_more_bits(i, 48): layers 0..5, 42..47 and (i - 6) % 3 == 2
    more = {i for i in range(n) if i < 6 or i >= 42 or (i - 6) % 3 == 2}
    kw = dict(n_layers=n, n_experts=128, tied=False)
    for i in range(n):
        want = "Q6_K" if i in more else "Q4_K"
        assert tensor_type(f"blk.{i}.ffn_down_exps.weight", (128, 2048, 768), "Q4_K_M", **kw)[0] == want
        assert tensor_type(f"blk.{i}.attn_v.weight", (512, 2048), "Q4_K_M", **kw)[0] == want
        assert tensor_type(f"blk.{i}.ffn_gate_exps.weight", (128, 768, 2048), "Q4_K_M", **kw)[0] == "Q4_K"
        assert tensor_type(f"blk.{i}.attn_q.weight", (4096, 2048), "Q5_K_M", **kw)[0] == "Q5_K"
        assert tensor_type(f"blk.{i}.ffn_down_exps.weight", (128, 2048, 768), "Q4_K", **kw)[0] == "Q4_K"  # pure
    assert tensor_type("output.weight", (151936, 2048), "Q4_K_M", **kw)[0] == "Q6_K"
    assert tensor_type("output.weight", (151936, 2048), "Q4_K", **kw)[0] == "Q4_K"
    assert tensor_type("token_embd.weight", (151936, 2048), "Q4_K_M", **kw)[0] == "Q4_K"
    assert tensor_type("token_embd.weight", (151936, 2048), "Q4_K_M", n_layers=n, n_experts=128, tied=True)[0] == "Q6_K"
    # 8-expert (Mixtral-style) models: attn_v / attn_k Q8_0, attn_output Q5_K at Q4_K_M
    kw8 = dict(n_layers=32, n_experts=8, tied=False)
    assert tensor_type("blk.3.attn_v.weight", (1024, 4096), "Q4_K_M", **kw8)[0] == "Q8_0"
    assert tensor_type("blk.3.attn_k.weight", (1024, 4096), "Q6_K", **kw8)[0] == "Q8_0"
    assert tensor_type("blk.3.attn_output.weight", (4096, 4096), "Q4_K_M", **kw8)[0] == "Q5_K"
    assert tensor_type("blk.3.attn_output.weight", (4096, 4096), "Q5_K_M", **kw8)[0] == "Q5_K"
    # not quantized: norms, routers, 1-D tensors, a one-row gate
    for name, shape in [("blk.0.attn_norm.weight", (2048,)), ("blk.0.ffn_gate_inp.weight", (128, 2048)),
                        ("blk.0.attn_q.bias", (4096,)), ("blk.0.ffn_gate_inp_shexp.weight", (1, 2048)),
                        ("blk.0.attn_q_norm.weight", (128,))]:
        assert not quantizable(name, shape)
        assert tensor_type(name, shape, "Q4_K_M", **kw) == ("keep", None)
    # llama.cpp's fallback for rows that are not whole 256-value blocks
    for t, fb in [("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0"), ("Q8_0", "Q8_0")]:
        got, note = tensor_type("blk.1.ffn_gate_exps.weight", (8, 128, 96), t, **kw)
        assert got == fb and (note is None) == (t == "Q8_0")
    assert tensor_type("blk.1.ffn_gate_exps.weight", (8, 128, 80), "Q4_K", **kw)[0] == "F16"
    got, note = tensor_type("blk.1.ffn_down_exps.weight", (8, 256, 128), "Q4_K", **kw)
    assert got == "Q5_0" and "blk.1.ffn_down_exps.weight" in note and "llama-quantize" in note
