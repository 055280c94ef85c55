"""Quantize a bf16 / fp32 checkpoint while loading it (``moetier.load(..., quantize="int4")``,
``moetier run/serve/chat --quantize int4 [--quantize-all] [--quantize-group 32]``).

* routed experts (default): :class:`QuantizingExpertReader` wraps the family's expert reader
  and quantizes each expert as it is read (round-to-nearest, deterministic: a tiered run that
  re-reads an expert gets the same bytes, so tiered runs equal in-RAM runs);
* ``quantize_all``: also every always-on linear weight that quantized releases quantize
  (attention, dense FFN, shared experts; never embeddings, norms, routers), through
  ``load_dense_weights(quantize=...)``: they become ``QLinear`` s; and the LM head
  (``convert.head_format``: int8 / fp8 as the rest, int8 g128 under int4) unless
  ``keep_head``. A tied head gets its own quantized copy (:func:`tied_head`); the embedding
  stays as loaded.

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
from moetier.quant.convert import head_format, is_head, quantizable, quantize_weight

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


def weight_quantizer(fmt: str, group: int, keep_head: bool = False) -> Callable[[str, torch.Tensor], QTensor | None]:
    """``(checkpoint name, float weight) -> QTensor | None`` for ``load_dense_weights(quantize=)``."""
    def q(name: str, w: torch.Tensor) -> QTensor | None:
        if is_head(name):
            head = head_format(fmt, group, keep_head, cols=w.shape[1])
            return None if head is None else quantize_weight(w, *head)
        return quantize_weight(w, fmt, group) if quantizable(name, w, experts_only=False) else None

    return q


def tied_head(net: Any, fmt: str, group: int, keep_head: bool = False) -> None:
    """A model whose LM head is its embedding (``tie_word_embeddings``): give it an ``lm_head``
    of its own, a quantized copy of the embedding [V, H] (the embedding stays as loaded)."""
    from moetier.layers.linear import QLinear

    emb = net.embed_tokens.weight  # [V, H]
    head = head_format(fmt, group, keep_head, cols=emb.shape[1])
    if head is None or net.lm_head is not None:
        return
    net.lm_head = QLinear(quantize_weight(emb, *head), None, emb.dtype)


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


def census_groups(fmt: str, group: int, quantize_all: bool, keep_head: bool = False, hidden: int | None = None) -> str:
    """The ``mixed:`` precision entries (``moetier.planner.census``) of the groups quantized at
    load, e.g. ``ffn=int4:g32,attention=int4:g32,lm_head=int8:g128``."""

    def name(f: str, g: int) -> str:
        return f if f == "fp8" else f"{f}:g{g}"

    if not quantize_all:
        return "routed=" + name(fmt, group)
    out = f"ffn={name(fmt, group)},attention={name(fmt, group)}"
    head = head_format(fmt, group, keep_head, cols=hidden)
    return out if head is None else out + ",lm_head=" + name(*head)


def add_arguments(p: Any) -> None:
    g = p.add_argument_group("quantize at load (bf16 / fp32 checkpoints)")
    g.add_argument("--quantize", default=None, choices=CHOICES,
                   help="keep routed experts in this format (int4 / int8 groups, fp8 blocks), quantized at load")
    g.add_argument("--quantize-all", action="store_true",
                   help="with --quantize: also attention, dense FFN, shared-expert weights and the LM head")
    g.add_argument("--quantize-group", type=int, default=None, choices=(32, 64, 128),
                   help="values per scale for int4 / int8 (default: int4 32, int8 128)")
    g.add_argument("--keep-head", action="store_true",
                   help="with --quantize-all: keep the LM head as stored (default: int8 / fp8 like the rest, "
                   "int8 group 128 under int4)")


def load_kwargs(args: Any) -> dict[str, Any]:
    fmt = getattr(args, "quantize", None)
    if fmt is None:
        if getattr(args, "quantize_all", False):
            raise ConfigError("--quantize-all needs --quantize int4|int8|fp8")
        if getattr(args, "keep_head", False):
            raise ConfigError("--keep-head needs --quantize int4|int8|fp8 --quantize-all")
        return {}
    if args.keep_head and not args.quantize_all:
        raise ConfigError("--keep-head needs --quantize-all (without it the LM head is not quantized)")
    return {"quantize": fmt, "quantize_all": bool(args.quantize_all), "quantize_group": args.quantize_group,
            **({"quantize_keep_head": True} if args.keep_head else {})}
