"""Quantize a state dict into a released on-disk layout (``moetier quantize``, tests).

* ``fp8``: FP8 e4m3 block-scaled, DeepSeek-V3 layout (``X.weight`` F8_E4M3 +
  ``X.weight_scale_inv`` float32 per block; ``quant_method: "fp8"``);
* ``int4`` / ``int8``: compressed-tensors pack-quantized, symmetric groups
  (``X.weight_packed`` int32, ``X.weight_scale``, ``X.weight_shape``; ``quant_method:
  "compressed-tensors"``, ``format: "pack-quantized"``);
* ``mxfp4``: gpt-oss's expert layout (``P_blocks`` / ``P_scales``) for fused transposed
  ``experts.gate_up_proj [E, H, 2I]`` / ``experts.down_proj [E, I, H]`` tensors.

Which weights: :func:`quantizable` (2-D linear weights; never embeddings, the LM head, norms,
routers or shared-expert gates), restricted to routed experts with ``experts_only``. The LM
head is quantized apart, in :func:`head_format` (``moetier quantize`` and ``--quantize-all``
unless ``--keep-head``): int8 / fp8 as the rest, int8 group 128 under int4 (an int4 head costs
too much quality); a tied head gets its own copy, the embedding stays.
Quantization is round-to-nearest (``moetier.quant.fp8.quantize``, ``intgroup.quantize``,
``mxfp4.quantize``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from moetier.quant import QTensor, fp8, intgroup, mxfp4

FORMATS = ("fp8", "int8", "int4")
GROUPS = (32, 64, 128)
_EXPERT = re.compile(r"\.experts\.(\d+\.)?")
_NEVER = re.compile(r"(embed_tokens|lm_head|norm|\.gate\.weight$|\.router\.|shared_expert_gate)")
_HEAD = re.compile(r"(^|\.)lm_head\.weight$")
HEAD_UNDER_INT4 = ("int8", 128)  # (format, group) of the LM head when the rest is int4


def quantizable(name: str, t: torch.Tensor, experts_only: bool) -> bool:
    """Whether ``name`` is a weight that a quantized release stores quantized."""
    if not name.endswith(".weight") or t.dim() != 2 or not t.is_floating_point() or _NEVER.search(name):
        return False
    return not experts_only or bool(_EXPERT.search(name))


def is_head(name: str) -> bool:
    """``name`` is the LM head's weight (``lm_head.weight``, ``language_model.lm_head.weight``)."""
    return bool(_HEAD.search(name))


def head_format(fmt: str, group: int, keep_head: bool = False, on_disk: bool = False,
                cols: int | None = None) -> tuple[str, int] | None:
    """``(format, group)`` of the LM head [V, ``cols``] when every linear weight is quantized to
    ``fmt`` (group ``group``), or ``None`` to keep it as stored. Under int4 the head is int8 g128
    (an int4 head costs too much quality; g64 / g32 when ``cols`` is not a multiple of 128:
    compressed-tensors reads whole groups only). FP8 checkpoints on disk (``on_disk``) keep it
    plain, as the FP8 releases do: transformers' FineGrainedFP8 quantizer leaves the output
    embedding out of its FP8 layers unless ``modules_to_not_convert`` says otherwise, so where
    it keeps FP8 layers (GPU) an F8 head's ``weight_scale_inv`` has no layer to go to (checked
    with transformers 5.24 on CPU, where it dequantizes everything at load: there the head's
    scales *are* applied, exactly when the vocabulary is whole 128-row blocks, and wrongly on a
    partial last block: 84 of 300 rows off)."""
    if keep_head or (fmt == "fp8" and on_disk):
        return None
    if fmt != "int4":
        return fmt, group
    f, g = HEAD_UNDER_INT4
    return f, next((x for x in (g, g // 2, g // 4) if cols and cols % x == 0), g)


def quantize_weight(w: torch.Tensor, fmt: str, group: int = 128,
                    block: tuple[int, int] = (128, 128)) -> QTensor:
    """One 2-D weight in ``fmt`` (``fp8`` | ``int8`` | ``int4`` | ``mxfp4``)."""
    if fmt == "fp8":
        return fp8.quantize(w, block)
    if fmt in ("int4", "int8"):
        return intgroup.quantize(w, int(fmt[3:]), group, scale_dtype=torch.bfloat16)
    if fmt == "mxfp4":
        return mxfp4.quantize(w)
    raise ValueError(f"format {fmt!r}")


def stored_tensors(name: str, q: QTensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The on-disk tensors of quantized weight ``name`` (``X.weight``)."""
    base = name[: -len(".weight")]
    if q.fmt == "fp8_e4m3_block":
        yield name, q.data
        yield f"{base}.weight_scale_inv", q.scale
    else:
        assert q.zero is None and q.fmt in ("int4_group", "int8_group")
        yield f"{base}.weight_packed", q.data
        yield f"{base}.weight_scale", q.scale
        yield f"{base}.weight_shape", torch.tensor(q.shape, dtype=torch.int64)


def _ct_group(bits: int, group: int, targets: list[str]) -> dict:
    return {"targets": targets,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None}


def quantization_config(fmt: str, group: int = 128, block: tuple[int, int] = (128, 128),
                        ignore: list[str] | None = None, head: tuple[str, int] | None = None) -> dict:
    """The config.json ``quantization_config`` of a checkpoint written by :func:`quantize_state_dict`;
    ``head``: the LM head's (format, group) when it is quantized in another scheme than the rest
    (compressed-tensors: a second config group targeting ``lm_head`` by name, which wins over
    the ``Linear`` class target; moetier matches a tensor to a group by bits and group count)."""
    if fmt == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(block)}
    if fmt == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": ignore or []}
    groups = {"group_0": _ct_group(int(fmt[3:]), group, ["Linear"])}
    if head is not None and head != (fmt, group):
        assert head[0] in ("int4", "int8"), head
        groups["group_1"] = _ct_group(int(head[0][3:]), head[1], ["lm_head"])
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore or [],
        "kv_cache_scheme": None,
    }


def quantize_state_dict(sd: dict[str, torch.Tensor], fmt: str, *, group: int = 128,
                        block: tuple[int, int] = (128, 128), experts_only: bool = False,
                        head: tuple[str, int] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``sd`` with its quantizable weights in ``fmt`` (``fp8`` | ``int8`` | ``int4``), and the LM
    head in ``head`` = (format, group) when given (:func:`head_format`; ``None``: kept, as the
    released layouts do). Returns the new state dict and the names of the linear modules left
    unquantized (for compressed-tensors' ``ignore``)."""
    out: dict[str, torch.Tensor] = {}
    ignore = []
    for name, t in sd.items():
        if head is not None and is_head(name) and t.dim() == 2 and t.is_floating_point():
            out.update(stored_tensors(name, quantize_weight(t, head[0], head[1], block)))
        elif quantizable(name, t, experts_only):
            out.update(stored_tensors(name, quantize_weight(t, fmt, group, block)))
        else:
            if name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name and "norm" not in name:
                ignore.append(name[: -len(".weight")])
            out[name] = t
    return out, ignore


def mxfp4_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss: fused transposed experts ``P.{gate_up,down}_proj [E, in, out]`` ->
    ``P.{gate_up,down}_proj_blocks [E, out, in/32, 16]`` + ``_scales [E, out, in/32]``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not (name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj")):
            out[name] = t
            continue
        qs = [mxfp4.quantize(t[e].T) for e in range(t.shape[0])]  # [out, in] each
        out[f"{name}_blocks"] = torch.stack([q.data.view(q.rows, -1, 16) for q in qs])
        out[f"{name}_scales"] = torch.stack([q.scale for q in qs])
    return out
