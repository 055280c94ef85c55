"""The embedded default model shipped in moetier/data/embedded/ (trained by scripts/train_embedded.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from moetier.spec import load_spec

EMBEDDED = Path(__file__).resolve().parents[1] / "moetier" / "data" / "embedded"
FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "routing_profile.json",
    "MODEL_CARD.md",
]
MAX_BYTES = 40 * 1000 * 1000


def _profile() -> dict:
    return json.loads((EMBEDDED / "routing_profile.json").read_text())


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))


@pytest.mark.parametrize("name", FILES)
def test_file_exists(name: str) -> None:
    path = EMBEDDED / name
    assert path.is_file(), f"{path} missing: run scripts/train_embedded.py"
    assert path.stat().st_size > 0


def test_weights_size_and_header() -> None:
    path = EMBEDDED / "model.safetensors"
    size = path.stat().st_size
    assert size <= MAX_BYTES, f"{path} is {size} bytes (> 40 MB)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    spec = load_spec(EMBEDDED / "config.json")
    # every tensor is bf16 and the data section exactly fills the file
    assert {t["dtype"] for t in header.values()} == {"BF16"}
    assert max(t["data_offsets"][1] for t in header.values()) + 8 + n == size
    # HF per-expert naming, all experts of all MoE layers present, untied lm_head
    for layer in range(spec.num_layers):
        assert f"model.layers.{layer}.mlp.gate.weight" in header
        for e in range(spec.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in header
    assert header["lm_head.weight"]["shape"] == [spec.vocab_size, spec.hidden_size]
    assert header["model.embed_tokens.weight"]["shape"] == [spec.vocab_size, spec.hidden_size]
    e0 = header["model.layers.0.mlp.experts.0.gate_proj.weight"]["shape"]
    assert e0 == [spec.expert_intermediate_size, spec.hidden_size]


def test_config_parses_with_load_spec() -> None:
    spec = load_spec(EMBEDDED / "config.json")
    assert spec.family == "qwen3_moe"
    assert spec.architecture == "Qwen3MoeForCausalLM"
    assert spec.num_experts >= 16
    assert 2 <= spec.top_k <= 4
    assert all(spec.moe_layers)
    assert spec.tie_word_embeddings is False
    tok = _tokenizer()
    assert spec.vocab_size == tok.get_vocab_size()


def test_tokenizer_round_trips_text() -> None:
    tok = _tokenizer()
    for text in [
        "And the LORD said unto Moses,",
        "Romeo.\nBut soft! what light through yonder window breaks?\n",
        "  odd   spacing\ttabs\n\nand unicode: café — naïve ✓ 日本",
        "",
    ]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # the corpus' English compresses well (> 2.5 characters per token)
    sample = "Then said Jesus unto them, Verily, verily, I say unto you, and the king's daughter."
    assert len(sample) / len(tok.encode(sample).ids) > 2.5


def test_tokenizer_config_special_tokens_and_chat_template() -> None:
    import jinja2

    cfg = json.loads((EMBEDDED / "tokenizer_config.json").read_text())
    tok = _tokenizer()
    for key in ("bos_token", "eos_token", "pad_token"):
        assert tok.token_to_id(cfg[key]) is not None, key
    assert tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None
    gen = json.loads((EMBEDDED / "generation_config.json").read_text())
    assert tok.token_to_id("<|im_end|>") in gen["eos_token_id"]
    template = jinja2.Environment().from_string(cfg["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "John 3:16"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nJohn 3:16<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id("<|im_start|>")  # specials are single tokens


def test_routing_profile_is_non_uniform_but_not_collapsed() -> None:
    prof = _profile()
    spec = load_spec(EMBEDDED / "config.json")
    assert prof["num_experts"] == spec.num_experts and prof["top_k"] == spec.top_k
    assert len(prof["layers"]) == sum(spec.moe_layers)
    assert prof["tokens"] >= 10_000
    n20 = max(1, round(0.2 * spec.num_experts))
    for layer in prof["layers"]:
        freq = layer["frequency"]
        assert len(freq) == spec.num_experts
        assert math.isclose(sum(freq), 1.0, abs_tol=1e-4)
        top = sorted(freq, reverse=True)
        share = sum(top[:n20])
        assert math.isclose(share, layer["top20pct_share"], abs_tol=1e-3)
        # hot experts exist: the busiest 20 % carry clearly more than 20 % of selections
        assert share > 0.28, (layer["layer"], share)
        # ...but the layer did not collapse onto a couple of experts
        assert share < 0.8, (layer["layer"], share)
        assert top[0] < 0.4
        assert layer["experts_for_90pct"] > spec.top_k * 2
        ent = -sum(p * math.log(p) for p in freq if p > 0) / math.log(spec.num_experts)
        assert math.isclose(ent, layer["entropy_normalized"], abs_tol=1e-3)
        assert 0.5 < ent < 0.99


def test_model_card_matches_profile() -> None:
    card = (EMBEDDED / "MODEL_CARD.md").read_text()
    assert "python scripts/train_embedded.py" in card
    for layer in _profile()["layers"]:
        assert f"| {layer['layer']} | {layer['entropy_normalized']:.3f} | {layer['top20pct_share']:.3f} |" in card


@pytest.mark.skipif(importlib.util.find_spec("moetier.runtime") is None, reason="moetier.runtime not built yet")
def test_runtime_loads_embedded_model_and_generates() -> None:
    import moetier

    model = moetier.load()
    assert model.spec.num_experts == load_spec(EMBEDDED / "config.json").num_experts
    text = model.generate("And the LORD said", max_tokens=16)
    assert isinstance(text, str) and text.strip()
