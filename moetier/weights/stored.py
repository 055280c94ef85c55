"""What a local checkpoint directory actually stores, per census group.

:func:`stored_census` reads only the safetensors headers and classifies every stored tensor
into the census groups (``moetier.planner.census.GROUPS``) by its HF-style name: real bytes
per group (quantized weights with their scales / zero points), the storage format of each
group's matrices, and whether the multi-token-prediction layers (``model.layers.{n >=
num_hidden_layers}``) are present at all. :func:`checkpoint_precision` turns the formats
into a census precision string, so ``moetier census DIR --precision checkpoint`` and
``moetier plan DIR --precision checkpoint`` (and the tiered loader's budget) use the stored
format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from moetier.spec import ModelSpec
from moetier.weights.safetensors_io import QInfo, SafetensorsIndex, TensorInfo

_LAYER = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.")
_PLAIN = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp32"}


def group_of(name: str, spec: ModelSpec) -> str:
    """The census group of stored tensor ``name`` (MTP layers: ``mtp``)."""
    m = _LAYER.match(name)
    if m is not None and int(m.group(1)) >= spec.num_layers:
        return "mtp"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head") or name.endswith("lm_head.weight"):
        return "lm_head"
    if re.search(r"\.(mlp|block_sparse_moe|feed_forward)\.(gate|router)\.|e_score_correction_bias|"
                 r"shared_expert_gate", name):
        return "router"
    if "norm" in name:
        return "norms"
    if ".experts." in name:
        return "routed_experts"
    if "shared_expert" in name:
        return "shared_experts"
    if "self_attn" in name or ".attention." in name:
        return "attention"
    return "dense_ffn"


def _format(info: TensorInfo | QInfo) -> str:
    if isinstance(info, QInfo):
        if info.fmt == "fp8_e4m3_block":
            return "fp8"
        if info.fmt == "mxfp4":
            return "fp4"
        return f"int{info.meta['bits']}:g{info.block[1]}"
    return _PLAIN.get(info.dtype, info.dtype.lower())


@dataclass
class StoredCensus:
    """Real stored bytes per census group of one checkpoint directory."""

    bytes: dict[str, int] = field(default_factory=dict)  # group -> stored bytes (all tensors)
    formats: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> {format: matrix bytes}
    has_mtp: bool = False

    def format_of(self, group: str) -> str | None:
        """The format holding most of the group's matrix bytes (None: the group stores no matrix)."""
        f = self.formats.get(group)
        return max(f, key=lambda k: f[k]) if f else None

    @property
    def total(self) -> int:
        return sum(b for g, b in self.bytes.items() if g != "mtp")


def stored_census(directory: str | Path, spec: ModelSpec) -> StoredCensus:
    idx = SafetensorsIndex(directory, quant=spec.quantization)
    try:
        out = StoredCensus()
        parts = {p.name for q in idx.quantized.values() for p in q.parts.values()}
        infos: list[TensorInfo | QInfo] = list(idx.quantized.values())
        infos += [i for n, i in idx.tensors.items() if n not in parts]
        for info in infos:
            g = group_of(info.name, spec)
            out.bytes[g] = out.bytes.get(g, 0) + info.nbytes
            if len(info.shape) >= 2:
                f = out.formats.setdefault(g, {})
                f[_format(info)] = f.get(_format(info), 0) + info.nbytes
        out.has_mtp = out.bytes.get("mtp", 0) > 0
        return out
    finally:
        idx.close()


def checkpoint_precision(directory: str | Path, spec: ModelSpec, stored: StoredCensus | None = None,
                         plain: str | None = None) -> str:
    """A census precision (``mixed:GROUP=FORMAT,...``) naming each group's stored format;
    ``plain`` (e.g. the runtime's ``bf16``) replaces the format of groups stored unquantized."""
    st = stored or stored_census(directory, spec)
    items = []
    for g in ("embedding", "lm_head", "attention", "norms", "router", "dense_ffn", "shared_experts",
              "routed_experts"):
        f = st.format_of(g)
        if f is not None:
            items.append(f"{g}={plain if plain and f in _PLAIN.values() else f}")
    return "mixed:" + ",".join(items + [f"default={plain or 'bf16'}"])
