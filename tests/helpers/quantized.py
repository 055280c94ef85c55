"""Tiny quantized checkpoints in the released on-disk layouts, and their dequantized twins.

``make_quantized_checkpoint(tmp, family, fmt)`` writes a random-weight tiny checkpoint
(:func:`tests.helpers.make_tiny_checkpoint`) and rewrites it the way the releases ship:

* ``fp8``: DeepSeek-V3 FP8 (every linear weight but embeddings / LM head / routers as F8_E4M3
  + float32 ``weight_scale_inv`` per block), optionally with a multi-token-prediction layer
  stored after ``num_hidden_layers`` (``model.layers.N.*``, as DeepSeek's files carry);
* ``mxfp4``: gpt-oss (experts as ``*_blocks`` / ``*_scales``, the rest unquantized);
* ``int4`` / ``int8``: compressed-tensors pack-quantized, symmetric groups.

``write_dequantized(src, dst)`` writes the same model with every quantized weight replaced by
its reference dequantization (float32, the plain layout transformers loads): the oracle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moetier.quant import QTensor
from moetier.quant.convert import mxfp4_experts, quantization_config, quantize_state_dict
from moetier.spec import load_spec
from moetier.weights.safetensors_io import SafetensorsIndex
from tests.helpers.checkpoints import make_tiny_checkpoint


def make_quantized_checkpoint(tmp_path: Path, family: str, fmt: str, *, group: int = 32,
                              block: tuple[int, int] = (128, 128), experts_only: bool = False, mtp: bool = False,
                              name: str | None = None, **overrides: Any) -> Path:
    ck = make_tiny_checkpoint(tmp_path, family, name=name or f"{family}-{fmt}", **overrides)
    f = ck / "model.safetensors"
    sd = load_file(f)
    cfg = json.loads((ck / "config.json").read_text())
    if mtp:  # a DeepSeek-style MTP layer after the last layer: a copy of the last layer's tensors + extras
        n = cfg["num_hidden_layers"]
        last = f"model.layers.{n - 1}."
        for k in [k for k in sd if k.startswith(last)]:
            sd[f"model.layers.{n}." + k[len(last):]] = sd[k].clone()
        H = cfg["hidden_size"]
        sd[f"model.layers.{n}.eh_proj.weight"] = torch.randn(H, 2 * H) / H
        sd[f"model.layers.{n}.enorm.weight"] = torch.ones(H)
        cfg["num_nextn_predict_layers"] = 1
    if fmt == "mxfp4":
        out, ignore = mxfp4_experts(sd), []
    else:
        out, ignore = quantize_state_dict(sd, fmt, group=group, block=block, experts_only=experts_only)
    save_file(out, f, metadata={"format": "pt"})
    cfg["quantization_config"] = quantization_config(fmt, group, block, ignore)
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


def dequantized_state_dict(ck: Path, drop_mtp: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``ck`` in float32, quantized ones through their reference dequantizer,
    under the names of the unquantized layout (MTP layers dropped)."""
    spec = load_spec(ck)
    idx = SafetensorsIndex(ck, quant=spec.quantization)
    parts = {p.name for q in idx.quantized.values() for p in q.parts.values()}
    out = {}
    for name in idx.names():
        if name not in parts:
            out[name] = idx.read(name, torch.float32)
    for name, q in idx.quantized.items():
        if len(q.shape) == 2:
            t = idx.read_q(name)
            assert isinstance(t, QTensor)
            out[name] = t.dequantize()
        else:  # gpt-oss experts: [E, out, in] stored, [E, in, out] in the plain layout
            es = [idx.read_rows_q(name, e) for e in range(q.shape[0])]
            out[name] = torch.stack([e.dequantize().T for e in es if isinstance(e, QTensor)])
    if drop_mtp:
        n = spec.num_layers
        out = {k: v for k, v in out.items() if not k.startswith(tuple(f"model.layers.{i}." for i in range(n, n + 4)))}
    return out


def write_dequantized(src: Path, dst: Path) -> Path:
    """A plain float32 copy of quantized checkpoint ``src`` (config without quantization_config)."""
    dst.mkdir(parents=True, exist_ok=True)
    save_file(dequantized_state_dict(src), dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("num_nextn_predict_layers", None)
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst
