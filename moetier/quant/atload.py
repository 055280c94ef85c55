"""Quantize a bf16 / fp32 checkpoint while loading it (``moetier.load(..., quantize="int4")``,
``moetier run/serve/chat --quantize int4 [--quantize-all] [--quantize-group 32]``).

* routed experts (default): :class:`QuantizingExpertReader` wraps the family's expert reader
  and quantizes each expert as it is read (round-to-nearest, deterministic: a tiered run that
  re-reads an expert gets the same bytes, so tiered runs equal in-RAM runs);
* ``quantize_all``: also every always-on linear weight that quantized releases quantize
  (attention, dense FFN, shared experts; never embeddings, LM head, norms, routers), through
  ``load_dense_weights(quantize=...)``: they become ``QLinear`` s.

Weights already stored quantized are kept as stored. Formats: ``int4`` / ``int8``
(``int4_group`` / ``int8_group``, symmetric, group ``quantize_group``, bf16 scales) and ``fp8``
(128x128 blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moetier.errors import ConfigError
from moetier.quant import QTensor
from moetier.quant.convert import quantizable, quantize_weight

CHOICES = ("int4", "int8", "fp8")
DEFAULT_GROUP = {"int4": 32, "int8": 128, "fp8": 128}


def check(fmt: str | None, group: int | None) -> int:
    """Validate the options; returns the group size to use."""
    if fmt not in CHOICES:
        raise ConfigError(f"quantize={fmt!r}: expected one of {', '.join(CHOICES)}")
    g = DEFAULT_GROUP[fmt] if group is None else group
    if fmt != "fp8" and (not isinstance(g, int) or g < 1):
        raise ConfigError(f"quantize_group={group!r}: expected a positive group size (32, 64, 128)")
    return g


def weight_quantizer(fmt: str, group: int) -> Callable[[str, torch.Tensor], QTensor | None]:
    """``(checkpoint name, float weight) -> QTensor | None`` for ``load_dense_weights(quantize=)``."""

    def q(name: str, w: torch.Tensor) -> QTensor | None:
        return quantize_weight(w, fmt, group) if quantizable(name, w, experts_only=False) else None

    return q


class QuantizingExpertReader:
    """An expert reader whose experts come out quantized (same interface as ExpertReader)."""

    quantized = True

    def __init__(self, inner: Any, fmt: str, group: int):
        self.inner, self.fmt, self.group = inner, fmt, group
        self.spec, self.index, self.dtype = inner.spec, inner.index, inner.dtype

    def _q(self, w: torch.Tensor | QTensor | None) -> Any:
        if w is None or isinstance(w, QTensor):
            return w
        return quantize_weight(w, self.fmt, self.group)

    def read(self, layer: int, expert: int) -> Any:
        from moetier.models.base import ExpertWeights

        w = self.inner.read(layer, expert)
        if w.quantized:
            return w
        return ExpertWeights.from_parts(self._q(w.gate), self._q(w.up), self._q(w.down), w.gate_bias, w.up_bias,
                                        w.down_bias)

    def expert_nbytes(self) -> int:
        return self.read(self.spec.moe_layer_ids[0], 0).nbytes


def add_arguments(p: Any) -> None:
    g = p.add_argument_group("quantize at load (bf16 / fp32 checkpoints)")
    g.add_argument("--quantize", default=None, choices=CHOICES,
                   help="keep routed experts in this format (int4 / int8 groups, fp8 blocks), quantized at load")
    g.add_argument("--quantize-all", action="store_true",
                   help="with --quantize: also attention, dense FFN and shared-expert weights")
    g.add_argument("--quantize-group", type=int, default=None, choices=(32, 64, 128),
                   help="values per scale for int4 / int8 (default: int4 32, int8 128)")


def load_kwargs(args: Any) -> dict[str, Any]:
    fmt = getattr(args, "quantize", None)
    if fmt is None:
        if getattr(args, "quantize_all", False):
            raise ConfigError("--quantize-all needs --quantize int4|int8|fp8")
        return {}
    return {"quantize": fmt, "quantize_all": bool(args.quantize_all), "quantize_group": args.quantize_group}
