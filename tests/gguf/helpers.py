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
