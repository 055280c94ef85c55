"""Llama-4 (text) parity with transformers: chunked attention shorter than the sequence, NoPE
layers with temperature tuning, L2 q/k norm, sigmoid router scaling the expert input, shared
expert, fused experts; and the text part of a Llama4ForConditionalGeneration checkpoint."""

import pytest
import torch

import moetier
from tests.helpers import FAMILIES, make_tiny_checkpoint
from tests.helpers.checkpoints import BASE, _randomize
from tests.helpers.moe_families import _llama4_init  # importing it registers the recipes
from tests.helpers.parity import assert_parity

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    # layers: rope+chunked(8), NoPE+full (temperature tuned, floor_scale 4), x2; all MoE top-1
    "chunked_nope_qknorm": {},
    # MoE every 2nd layer (dense FFN otherwise), no qk norm, top-2, llama3 rope, GQA 4:1, tied
    "interleaved_top2_llama3_tied": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_experts_per_tok=2,
                                         rope_parameters=LLAMA3_ROPE, num_key_value_heads=1,
                                         tie_word_embeddings=True),
    # no temperature tuning, explicit no_rope_layers and moe_layers
    "explicit_layers": dict(attn_temperature_tuning=False, no_rope_layers=[1, 1, 0, 1], moe_layers=[0, 2, 3],
                            attention_chunk_size=5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_llama4_parity(tmp_path, name):
    path = make_tiny_checkpoint(tmp_path, "llama4", tokenizer=False, **CONFIGS[name])
    assert_parity(path)


def test_llama4_conditional_generation_text_part(tmp_path):
    """A multimodal checkpoint (language_model.model.*) runs like its text-only twin."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = {**BASE, **FAMILIES["llama4"].defaults}
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    gen = torch.Generator().manual_seed(0)
    _randomize(hf.language_model, gen)
    _llama4_init(hf.language_model, gen)
    hf.save_pretrained(tmp_path / "mm")
    hf.language_model.save_pretrained(tmp_path / "text")
    assert_parity(tmp_path / "text")  # the text twin matches transformers

    mm = moetier.load(tmp_path / "mm", dtype="float32", tokenizer=False)
    assert mm.spec.architecture == "Llama4ForConditionalGeneration"
    txt = moetier.load(tmp_path / "text", dtype="float32", tokenizer=False)
    ids = list(range(3, 43))
    assert torch.equal(mm.logits(ids), txt.logits(ids))
