"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules.

:func:`rope_frequencies` turns a ``rope_scaling`` mapping (as normalised by ModelSpec) into
``(inv_freq [dim/2], attention_factor)``. :class:`Rotary` caches cos/sin tables and applies
the rotation in the "rotate half" layout (the one the HF checkpoints use); an
``interleaved=True`` variant rotates adjacent pairs (used by some MLA checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from moetier.errors import ConfigError


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(
    dim: int,
    base: float,
    scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int = 4096,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (float32) and the cos/sin scale for a rope config."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))

    def need(key: str) -> float:
        v = scaling.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"config.json: rope_scaling ({kind}) field '{key}' must be a number, got {v!r}")
        return float(v)

    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / need("factor"), 1.0
    if kind == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old_ctx = need("original_max_position_embeddings")
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
        factor = scaling.get("factor")
        factor = float(factor) if factor is not None else max_position_embeddings / orig
        attn_factor = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attn_factor is None:
            if mscale and mscale_all:
                attn_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
            else:
                attn_factor = yarn_get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1
        truncate = scaling.get("truncate", True)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1 -> keep original frequency, 0 -> interpolate
        inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv, float(attn_factor)
    raise ConfigError(
        f"config.json: rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn)"
    )


class Rotary:
    """cos/sin tables for positions, grown on demand; not an nn.Module (no weights)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float = 1.0, interleaved: bool = False):
        self.inv_freq = inv_freq.float()
        self.attention_factor = attention_factor
        self.interleaved = interleaved
        self._cos = torch.empty(0, device="cpu")
        self._sin = torch.empty(0, device="cpu")
        self._dtype: torch.dtype | None = None

    def _grow(self, n: int, dtype: torch.dtype) -> None:
        n = max(n, 2 * self._cos.shape[0], 256)
        freqs = torch.arange(n, dtype=torch.float32, device="cpu")[:, None] * self.inv_freq[None, :]  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        self._cos = (emb.cos() * self.attention_factor).to(dtype)
        self._sin = (emb.sin() * self.attention_factor).to(dtype)
        self._dtype = dtype

    def table(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cos, sin tables [>= n, D] in ``dtype`` (grown if needed)."""
        if n > self._cos.shape[0] or dtype != self._dtype:
            self._grow(n, dtype)
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for integer positions [T] (``max_position``: their max, if known)."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else -1
        if max_position >= self._cos.shape[0] or dtype != self._dtype:
            self._grow(max_position + 1, dtype)
        return self._cos[positions], self._sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [T, heads, D] by cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:  # pairs (x0, x1), (x2, x3), ... -> de-interleave, rotate, re-interleave
        T, h, d = x.shape
        x = x.view(T, h, d // 2, 2).transpose(-1, -2).reshape(T, h, d)
        out = x * cos + rotate_half(x) * sin
        return out
    return x * cos + rotate_half(x) * sin
