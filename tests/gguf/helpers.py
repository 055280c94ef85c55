"""Shared helpers for the GGUF tests: the committed fixtures and their HF originals."""

from __future__ import annotations

from pathlib import Path

import torch

from scripts.make_gguf_fixtures import FIXTURES
from tests.helpers import moe_families  # noqa: F401  (registers the deepseek recipes)
from tests.helpers.checkpoints import hf_model

DATA = Path(__file__).resolve().parent.parent / "data" / "gguf"


def fixture(name: str) -> Path:
    return DATA / f"{name}.gguf"


def hf_original(name: str) -> torch.nn.Module:
    """The transformers model the fixture was converted from (float32; parameters rounded to
    the dtype the checkpoint was saved in, as ``save_pretrained`` stored them)."""
    family, seed, over, outtype, _ = FIXTURES[name]
    model = hf_model(family, seed=seed, **over)
    if outtype == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
            for n, b in model.named_buffers():
                if n.endswith("e_score_correction_bias"):  # saved with the checkpoint (bf16)
                    b.copy_(b.to(torch.bfloat16).float())
    return model


def rewrite_gguf(src: Path, dst: Path, *, split_max_tensors: int = 0, retype: dict[str, int] | None = None,
                 unmerge_experts: bool = False, requant: dict[str, int] | None = None) -> None:
    """Copy a GGUF file with gguf-py's writer: optionally split (``dst`` gets the
    ``-0000i-of-0000n`` names), relabel tensors' ggml type (``retype``: name -> type id, the
    bytes unchanged; to make files with types moetier refuses), re-quantize tensors to another
    type (``requant``: name -> type id, gguf-py's dequantize then quantize), or write merged
    experts as the older per-expert tensors ``blk.N.ffn_gate.E.weight`` (``unmerge_experts``)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch, split_max_tensors=split_max_tensors)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub)
    for t in r.tensors:
        qtype = gguf.GGMLQuantizationType((retype or {}).get(t.name, int(t.tensor_type)))
        data = np.array(t.data).view(np.uint8).reshape(-1)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        if t.name in (requant or {}):
            qtype = gguf.GGMLQuantizationType(requant[t.name])  # type: ignore[index]
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            data = gguf.quants.quantize(values, qtype).reshape(-1)
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        data = data.reshape(*shape[:-1], shape[-1] // bs * ts)
        if unmerge_experts and t.name.endswith("_exps.weight"):
            for e in range(shape[0]):
                w.add_tensor(t.name.replace("_exps.weight", f".{e}.weight"), data[e].copy(), raw_dtype=qtype)
            continue
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
