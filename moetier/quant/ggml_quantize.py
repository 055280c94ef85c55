"""Quantize float weights into ggml block types (the writing side of :mod:`moetier.quant.ggml`).

:func:`quantize` turns float32 rows ``[n, cols]`` into the stored bytes ``[n, row_bytes]`` of
one GGUF tensor type:

* ``Q8_0``, ``Q5_0``, ``Q5_1``, ``Q4_0``, ``Q4_1``: ``gguf.quants.quantize`` (llama.cpp's
  gguf-py; the round-to-nearest reference quantizers its converter uses);
* ``Q4_K``, ``Q5_K``, ``Q6_K``: written here in numpy, vectorised over blocks, following the
  algorithm of llama.cpp's reference quantizers (``quantize_row_q{4,5,6}_K_ref`` in
  ``ggml-quants.c``, the ones ``llama-quantize`` runs without an importance matrix):

  - Q4_K / Q5_K: per 32-value sub-block, a weighted least-squares search for (scale, min)
    over ``nstep + 1`` candidate inverse scales ``(rmin + rdelta * is + nmax) / (max - min)``
    with weights ``sqrt(mean(x^2)) + |x|`` (llama.cpp's ``make_qkx2_quants``; Q4_K: nmax 15,
    rmin -1, rdelta 0.1, 20 steps; Q5_K: nmax 31, rmin -0.5, rdelta 0.1, 15 steps); the 8
    scales and 8 mins are then quantized to 6 bits against the super-block's largest
    (``d = max_scale / 63``, ``dmin = max_min / 63``, float16) and every value is re-rounded
    against its final dequantized scale and min.
  - Q6_K: per 16-value sub-block, a signed scale search over the 19 inverse scales
    ``-(32 + 0.1 * is) / max`` (``is`` in -9..9) maximising ``sum(w x l)^2 / sum(w l^2)``
    with ``w = x^2`` (``make_qx_quants``, rmse type 1); the 16 scales are quantized to int8
    against the largest (``d = max_scale / -128``), then every value re-rounded.

  Every step is float32 in the same operation order as the C code (sums accumulated one value
  at a time, ``nearest_int`` = round half to even, float16 conversion round to nearest), so
  the blocks are meant to be byte-identical to llama.cpp's; ``bench/bench_gguf_quantize.py``
  measures how close they are on the embedded model.

A row whose length is not a whole number of blocks is refused here; :func:`tensor_type` picks
llama.cpp's fallback type first (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; a row that fits no
32-value block stays F16).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from moetier.errors import ConfigError
from moetier.quant.ggml import BY_TYPE, GGML_TYPE_NAMES, QK_K

TYPE_IDS = {name: tid for tid, name in GGML_TYPE_NAMES.items()}
F32 = np.float32


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, as GGML_FP32_TO_FP16) -> its float32 value."""
    return v.astype(np.float16).astype(F32)


def _nearest(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: round half to even (int32)."""
    return np.rint(v).astype(np.int32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """[N, n] -> [N]: float32 sum over n, one value at a time in order (as a C loop; numpy's
    own reductions sum pairwise, which rounds differently)."""
    s = a[:, 0].copy()
    for i in range(1, a.shape[1]):
        s += a[:, i]
    return s


# ----------------------------------------------------------------------------- Q4_K / Q5_K


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric sub-block quantization (llama.cpp's ``make_qkx2_quants``, squared error).

    x, w [N, n] float32 -> (scale [N], the_min [N] (>= 0; value = scale * L - the_min), L [N, n] uint8)."""
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        diff = (scale[:, None] * L.astype(F32) + mn[:, None]) - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            la = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = la.astype(F32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            d = (this_scale[:, None] * lf + this_min[:, None]) - x
            err = _seqsum(w * (d * d))
            better = (D > 0) & (err < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.uint8)


def _kquant_scales(x: np.ndarray, nmax: int, rmin: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of Q4_K / Q5_K: x [nb, 256] -> (d [nb] f16 bits, dmin [nb] f16 bits,
    6-bit scales [nb, 8], 6-bit mins [nb, 8], L [nb, 256] uint8)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    sum_x2 = _seqsum(xs * xs)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 256)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) & 0xFF, 63)  # stored in a uint8 first
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    d = d16.astype(F32)[:, None] * ls.astype(F32)  # [nb, 8]
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest((x.reshape(nb, 8, 32) + dm[:, :, None]) / d[:, :, None])
    q = np.clip(q, 0, nmax).reshape(nb, 256)
    L = np.where(np.repeat(d != 0, 32, axis=1), q, L).astype(np.uint8)  # d == 0: keep the search's L
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), L


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins [nb, 8] -> the 12-byte K-quant packing [nb, 12]."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _kquant_scales(x, 15, -1.0, 20)
    nb = x.shape[0]
    L4 = L.reshape(nb, 4, 2, 32)  # 64-value chunks: first 32 in low nibbles, next 32 in high
    qs = (L4[:, :, 0] | (L4[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                           _pack_scale_min(ls, lm), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _kquant_scales(x, 31, -0.5, 15)
    nb = x.shape[0]
    L8 = L.reshape(nb, 8, 32)  # sub-block j: its high bit is bit j of qh[i]
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (L8[:, j] >> 4) << j
    lo = (L8 & 0xF).reshape(nb, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                           _pack_scale_min(ls, lm), qh, qs], axis=1)


# ----------------------------------------------------------------------------- Q6_K


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric sub-block quantization (llama.cpp's ``make_qx_quants``, rmse type 1, no
    importance weights): x [N, n] -> (scale [N], L [N, n] in 0..2*nmax-1)."""
    ax = np.abs(x)
    i_max = ax.argmax(axis=1)  # first of equal magnitudes
    amax = ax[np.arange(x.shape[0]), i_max]
    mx = x[np.arange(x.shape[0]), i_max]
    zero = amax < F32(1e-15)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lf = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
            return lf, _seqsum(wx * lf), _seqsum((w * lf) * lf)

        lf, sumlx, suml2 = trial(F32(-nmax) / mx)
        L = lf
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            lf, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], lf, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], F32(-nmax), L)  # all-zero sub-block: stored 0
    scale = np.where(zero, F32(0), scale)
    return scale.astype(F32), (L + F32(nmax)).astype(np.int32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, L = _make_qx(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    i_max = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), i_max]
    zero = np.abs(max_scale) < F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d16 = np.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
        sc = np.where(zero[:, None], 0, np.minimum(127, _nearest(iscale[:, None] * scales))).astype(np.int8)
        d = d16.astype(F32)[:, None] * sc.astype(F32)  # [nb, 16]
        q = np.clip(_nearest(x.reshape(nb, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where(np.repeat(d != 0, 16, axis=1), q.reshape(nb, 256), L)
    L = np.where(zero[:, None], 0, L).astype(np.uint8)  # an all-zero block is stored as zeros
    L4 = L.reshape(nb, 2, 4, 32)  # per 128-value half: four 32-value quarters
    ql = np.concatenate([L4[:, :, 0] & 0xF | ((L4[:, :, 2] & 0xF) << 4),
                         L4[:, :, 1] & 0xF | ((L4[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L4[:, :, 0] >> 4) | ((L4[:, :, 1] >> 4) << 2) | ((L4[:, :, 2] >> 4) << 4)
          | ((L4[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)


# ----------------------------------------------------------------------------- entry points

_OURS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_GGUF_PY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
FLOAT_TYPES = ("F32", "F16", "BF16")
CHUNK_BLOCKS = 1 << 9  # super-blocks per numpy pass: temporaries stay in cache (2.3x faster than 1 << 14)


def block_size(type_name: str) -> int:
    return 1 if type_name in FLOAT_TYPES else BY_TYPE[TYPE_IDS[type_name]].block_size


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """float rows ``[n, cols]`` -> stored bytes uint8 ``[n, row_bytes]`` of ggml type ``type_name``."""
    if type_name not in QUANT_TYPES:
        raise ConfigError(f"ggml type {type_name!r}: expected one of {', '.join(QUANT_TYPES)}")
    fmt = BY_TYPE[TYPE_IDS[type_name]]
    w = np.ascontiguousarray(w, dtype=F32)
    rows, cols = w.shape
    if cols % fmt.block_size:
        raise ConfigError(f"{type_name}: rows of {cols} values are not whole {fmt.block_size}-value blocks")
    if type_name in _GGUF_PY:
        import gguf

        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name]).reshape(rows, fmt.row_bytes(cols))
    blocks = w.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], fmt.type_size), dtype=np.uint8)
    for a in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[a:a + CHUNK_BLOCKS] = _OURS[type_name](blocks[a:a + CHUNK_BLOCKS])
    return out.reshape(rows, fmt.row_bytes(cols))


# ----------------------------------------------------------------------------- which type per tensor
# llama.cpp's choices (llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type,
# tensor_type_fallback), for the recipes moetier writes.

RECIPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_K_M", "Q4_K_M")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # when a row is not whole 256-blocks
# general.file_type (llama_ftype) of each recipe
FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K": 17, "Q4_K": 15, "Q5_K_M": 17, "Q4_K_M": 15,
              "BF16": 32}
_NOT_QUANTIZED = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight)$")


def quantizable(gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize would quantize this tensor: 2-D or 3-D (trailing 1s not counted),
    a ``.weight``, not a norm or an expert router."""
    dims = len(shape)
    while dims > 1 and shape[0] == 1:  # shape is rows-first: leading 1s are ggml's trailing dims
        shape, dims = shape[1:], dims - 1
    return dims >= 2 and gguf_name.endswith("weight") and not _NOT_QUANTIZED.search(gguf_name)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(gguf_name: str, shape: tuple[int, ...], recipe: str, *, n_layers: int, n_experts: int,
                tied: bool) -> tuple[str, str | None]:
    """(ggml type name, note) for one tensor under ``recipe``: ``"keep"`` for a tensor
    llama-quantize leaves as it is (the caller keeps its float type); ``note`` says when
    llama.cpp's shape fallback applied.

    Q4_K / Q5_K put every quantizable tensor in that type (llama-quantize ``--pure``). Q8_0,
    Q6_K, Q5_K_M and Q4_K_M are llama.cpp's presets (``llama_tensor_get_type``):
    output.weight (and a tied token_embd) Q6_K (Q8_0 when its rows are not whole 256-blocks;
    Q8_0 preset: Q8_0); Q4_K_M / Q5_K_M: attn_v, and ffn_down (routed and shared experts), in
    the layers :func:`_more_bits` picks at Q6_K; 8-expert (Mixtral-style) models: attn_v and
    attn_k Q8_0 (Q4_K_M, Q5_K_M, Q6_K), attn_output Q5_K (Q4_K_M)."""
    if not quantizable(gguf_name, shape):
        return "keep", None
    base = recipe.split("_")[0] + "_" + recipe.split("_")[1]  # Q4_K_M -> Q4_K
    t = base
    if recipe in ("Q4_K_M", "Q5_K_M", "Q6_K"):
        layer_m = re.match(r"^blk\.(\d+)\.", gguf_name)
        layer = int(layer_m[1]) if layer_m else -1
        cols = shape[-1]
        if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
            t = "Q8_0" if cols % QK_K else "Q6_K"
        elif "attn_v.weight" in gguf_name or "attn_qkv.weight" in gguf_name or "attn_kv_b.weight" in gguf_name:
            if recipe != "Q6_K" and _more_bits(layer, n_layers):
                t = "Q6_K"
            if n_experts == 8:
                t = "Q8_0"
        elif "attn_k.weight" in gguf_name and n_experts == 8:
            t = "Q8_0"
        elif "attn_output.weight" in gguf_name and n_experts == 8 and recipe == "Q4_K_M":
            t = "Q5_K"
        elif "ffn_down" in gguf_name and "ffn_up" not in gguf_name and "ffn_gate" not in gguf_name:
            if recipe != "Q6_K" and _more_bits(layer, n_layers):
                t = "Q6_K"
    note = None
    if shape[-1] % block_size(t):
        fb = FALLBACK.get(t, t)
        if shape[-1] % block_size(fb):
            fb = "F16"
        note = (f"{gguf_name}: rows of {shape[-1]} values are not whole {block_size(t)}-value {t} blocks; "
                f"{fb} instead (llama-quantize's fallback)")
        t = fb
    return t, note
