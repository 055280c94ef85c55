"""Tiny checkpoints for tests: ``make_tiny_checkpoint(tmp_path, family, **config_overrides)``.

Builds a transformers model of the family with small random weights (scaled up so routing and
logits are decisive), saves it with ``save_pretrained`` (the real on-disk format), and writes a
small byte-level BPE ``tokenizer.json`` + ``tokenizer_config.json`` with a chat template.

Other families plug in with :func:`register_family` (e.g. in their test module or conftest)::

    register_family("gpt_oss", "GptOssConfig", "GptOssForCausalLM", {...defaults...})
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass
class FamilyRecipe:
    config_class: str  # name in transformers, e.g. "Qwen3MoeConfig"
    model_class: str  # e.g. "Qwen3MoeForCausalLM"
    defaults: dict[str, Any] = field(default_factory=dict)
    # optional hook to adjust the random weights (model, generator) -> None
    init: Callable[[torch.nn.Module, torch.Generator], None] | None = None


FAMILIES: dict[str, FamilyRecipe] = {
    "llama": FamilyRecipe("LlamaConfig", "LlamaForCausalLM", {}),
    "mixtral": FamilyRecipe(
        "MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2)
    ),
    "qwen2_moe": FamilyRecipe(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, norm_topk_prob=False),
    ),
    "qwen3_moe": FamilyRecipe(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
             head_dim=16),
    ),
    "olmoe": FamilyRecipe(
        "OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)
    ),
}


def register_family(name: str, config_class: str, model_class: str, defaults: dict[str, Any],
                    init: Callable[[torch.nn.Module, torch.Generator], None] | None = None) -> None:
    """Add (or replace) a family recipe for :func:`make_tiny_checkpoint`."""
    FAMILIES[name] = FamilyRecipe(config_class, model_class, dict(defaults), init)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(directory: Path, vocab_size: int = 300) -> None:
    """Byte-level BPE over a tiny corpus: 256 byte symbols + 3 specials + a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, hello moetier! " * 4,
              "Once upon a time there was a tiny model that ran on a CPU."]
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(["<|user|>", "<|assistant|>", "<|system|>"])
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights with std 1/sqrt(fan_in) (norms around 1) so logits and routing are far from ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                std = 1.0 / fan_in**0.5
                if "embed" in name:
                    std = 1.0
                if name.endswith("gate.weight") and "proj" not in name:  # routers: decisive
                    std = 4.0 / fan_in**0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))


def hf_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-weight transformers model of ``family`` (float32, eval, eager attention)."""
    import transformers

    recipe = FAMILIES[family]
    cfg_cls = getattr(transformers, recipe.config_class)
    cfg = cfg_cls(**{**BASE, **recipe.defaults, **overrides})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, recipe.model_class)(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    if recipe.init is not None:
        recipe.init(model, gen)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def make_tiny_checkpoint(
    tmp_path: Path,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    name: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny ``family`` checkpoint under ``tmp_path`` and return its directory.

    ``config_overrides`` go to the transformers config (e.g. ``num_key_value_heads=1``,
    ``mlp_only_layers=[0]``, ``tie_word_embeddings=True``). ``max_shard_size`` (e.g. "20KB")
    writes several shards plus model.safetensors.index.json.
    """
    out = Path(tmp_path) / (name or f"tiny-{family}")
    out.mkdir(parents=True, exist_ok=True)
    model = hf_model(family, seed=seed, **config_overrides).to(dtype)
    kw: dict[str, Any] = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kw)
    if tokenizer:
        make_tokenizer(out, vocab_size=model.config.vocab_size)
    return out


def fuse_experts(directory: Path) -> None:
    """Rewrite a single-file checkpoint's per-expert tensors as fused ``experts.gate_up_proj``
    [E, 2I, H] and ``experts.down_proj`` [E, H, I] (transformers 5.x in-memory layout)."""
    import re

    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    sd = load_file(path)
    pat = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = pat.match(k)
        if m is None:
            out[k] = v
            continue
        role = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m[3], m[3])
        groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[role] = v
    for prefix, experts in groups.items():
        es = [experts[e] for e in sorted(experts)]
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate_proj"], x["up_proj"]]) for x in es])
        out[f"{prefix}.experts.down_proj"] = torch.stack([x["down_proj"] for x in es])
    save_file(out, path, metadata={"format": "pt"})
