"""Test helpers: tiny random-weight checkpoints written by transformers' save_pretrained."""

from tests.helpers.checkpoints import (
    FAMILIES,
    FamilyRecipe,
    fuse_experts,
    hf_model,
    make_tiny_checkpoint,
    make_tokenizer,
    register_family,
)

__all__ = [
    "FAMILIES",
    "FamilyRecipe",
    "fuse_experts",
    "hf_model",
    "make_tiny_checkpoint",
    "make_tokenizer",
    "register_family",
]
