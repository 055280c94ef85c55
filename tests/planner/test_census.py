"""Weight census: published figures, an exact transformers oracle, precisions, the CLI."""

from __future__ import annotations

import json

import pytest

from moetier import catalog
from moetier.cli import main
from moetier.errors import MoetierError
from moetier.planner.census import ALWAYS_ON_GROUPS, GROUPS, Census, census, parse_precision
from moetier.spec import spec_from_config

# ---------------------------------------------------------------------------------------
# acceptance: published totals within 2 %, active within 3 %
# (total, active, which census field the publisher's active figure corresponds to)
PUBLISHED = {
    # DeepSeek-V3 README: 671B main model, 37B activated (embedding + LM head counted)
    "deepseek-v3": (671e9, 37e9, "active_params"),
    # Mistral: 46.7B total, 12.9B per token
    "mixtral-8x7b": (46.7e9, 12.9e9, "active_params"),
    # Qwen3-30B-A3B model card: 30.5B / 3.3B
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "active_params"),
    # openai/gpt-oss README: 117B / 5.1B, LM head counted, embedding lookup not
    "gpt-oss-120b": (117e9, 5.1e9, "active_params_excluding_embedding"),
    # allenai/OLMoE README: 6.9B / 1.3B
    "olmoe-1b-7b": (6.9e9, 1.3e9, "active_params"),
}


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals_and_active(name: str) -> None:
    total, active, field = PUBLISHED[name]
    c = census(catalog.get(name))
    assert _rel(c.total_params, total) < 0.02, (c.total_params, total)
    assert _rel(getattr(c, field), active) < 0.03, (getattr(c, field), active)
    # the catalog records the same convention the test uses
    assert catalog.published(name).census_field == field


def test_gpt_oss_conventions_differ_by_one_embedding_matrix() -> None:
    c = census(catalog.get("gpt-oss-120b"))
    s = c.spec
    assert c.active_params - c.active_params_excluding_embedding == s.vocab_size * s.hidden_size
    # counting the embedding would miss OpenAI's 5.1B by > 10 %: the conventions really differ
    assert _rel(c.active_params, 5.1e9) > 0.10


def test_deepseek_v3_two_always_on_sets() -> None:
    c = census(catalog.get("deepseek-v3"))
    # the FFN-only hot set: shared experts 3*7168*2048*58 + dense FFN 3*7168*18432*3
    assert c.always_on_ffn_params == 3 * 7168 * 2048 * 58 + 3 * 7168 * 18432 * 3
    assert c.groups["shared_experts"].params == 3 * 7168 * 2048 * 58
    assert c.groups["dense_ffn"].params == 3 * 7168 * 18432 * 3
    assert 3.7e9 < c.always_on_ffn_params < 3.8e9
    # the complete set adds attention of all 61 layers, norms, routers, embedding and LM head
    assert c.always_on_params == sum(c.groups[g].params for g in ALWAYS_ON_GROUPS)
    assert 15e9 < c.always_on_params < 17.5e9
    # MLA per layer, written out: q_a (7168->1536) + q_b (1536->128*192) + kv_a (7168->512+64)
    # + kv_b (512->128*(128+128)) + o (128*128->7168)
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert c.groups["attention"].params == 61 * mla
    # norms: 2 per layer + q_a_layernorm + kv_a_layernorm, + final norm
    assert c.groups["norms"].params == 61 * (2 * 7168 + 1536 + 512) + 7168
    # routers: gate 256x7168 + e_score_correction_bias, 58 MoE layers
    assert c.groups["router"].params == 58 * (256 * 7168 + 256)
    assert c.expert_params == 3 * 7168 * 2048
    assert c.groups["routed_experts"].active_params == 58 * 8 * c.expert_params


def test_deepseek_v3_mtp_listed_apart() -> None:
    c = census(catalog.get("deepseek-v3"))
    mtp = c.groups["mtp"]
    assert not mtp.always_on and mtp.active_params == 0
    assert c.total_params == sum(g.params for g in c.groups.values() if g.name != "mtp")
    # README_WEIGHTS: 11.5B unique MTP params; 685B on HF (MTP stores embedding + head copies)
    assert _rel(mtp.params, 11.5e9) < 0.02
    assert _rel(c.checkpoint_params, 685e9) < 0.005
    assert census(catalog.get("mixtral-8x7b")).groups["mtp"].params == 0


def test_totals_are_consistent() -> None:
    for name in catalog.names():
        c = census(catalog.get(name), "int4")
        assert set(c.groups) == set(GROUPS)
        assert c.total_params == c.always_on_params + c.routed_params
        assert c.total_bytes == pytest.approx(c.always_on_bytes + c.routed_bytes)
        assert c.active_params >= c.active_params_excluding_embedding
        assert c.expert_params * c.spec.num_experts * c.spec.num_moe_layers == c.routed_params
        assert 0 < c.active_bytes <= c.total_bytes


# ---------------------------------------------------------------------------------------
# exact oracle: transformers builds the tiny model, we count its parameters per group


def _group_of(name: str) -> str:
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    if "embed_tokens" in parts:
        return "embedding"
    if parts[0] == "lm_head":
        return "lm_head"
    if "norm" in module:
        return "norms"
    if "self_attn" in parts:
        return "attention"
    if "shared_expert_gate" in parts or "router" in parts or module == "gate" or parts[-1] == "e_score_correction_bias":
        return "router"
    if "experts" in parts:
        return "routed_experts"
    if "shared_expert" in parts or "shared_experts" in parts:
        return "shared_experts"
    return "dense_ffn"


TINY = {
    "deepseek_v3": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_group=2, topk_group=1,
    ),
    "deepseek_v2": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, attention_bias=True,
    ),
    "qwen2_moe": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
        shared_expert_intermediate_size=40, mlp_only_layers=[1], decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6, num_experts_per_tok=2,
        decoder_sparse_step=2, tie_word_embeddings=True,
    ),
    "mixtral": dict(
        vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    ),
    "olmoe": dict(
        vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
    ),
    "gpt_oss": dict(
        vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, num_local_experts=4, num_experts_per_tok=2,
    ),
    "llama4_text": dict(
        vocab_size=97, hidden_size=64, intermediate_size=48, intermediate_size_mlp=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2,
    ),
    "llama": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
}


@pytest.fixture(scope="module")
def hf_counts() -> dict[str, tuple[dict, dict[str, int]]]:
    transformers = pytest.importorskip("transformers")  # test oracle (a dev dependency)
    import torch

    out = {}
    torch.manual_seed(0)
    for mt, kw in TINY.items():
        cfg = transformers.AutoConfig.for_model(mt, **kw)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        counts = {g: 0 for g in GROUPS}
        seen = set()
        for n, p in model.named_parameters():  # tied weights are yielded once
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts[_group_of(n)] += p.numel()
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                counts["router"] += b.numel()
        out[mt] = (cfg.to_dict(), counts)
    return out


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_census_matches_transformers_exactly(model_type: str, hf_counts) -> None:
    cfg, counts = hf_counts[model_type]
    c = census(spec_from_config(cfg, name=model_type))
    got = {g: c.groups[g].params for g in GROUPS if g != "mtp"}
    want = {g: counts[g] for g in GROUPS if g != "mtp"}
    if c.spec.tie_word_embeddings:  # transformers' tied lm_head is the embedding parameter
        assert got["lm_head"] == 0
    assert got == want
    assert c.total_params == sum(counts.values())


# ---------------------------------------------------------------------------------------
# precision


def test_precision_bytes_per_param() -> None:
    assert parse_precision("bf16").bytes_per_param("routed_experts") == 2.0
    assert parse_precision("fp32").bytes_per_param("norms") == 4.0
    # int4: 4 bits + one fp16 scale per 128 (default) or 32 weights
    assert parse_precision("int4").bytes_per_param("attention") == 0.5 + 2 / 128
    assert parse_precision("int4:g32").bytes_per_param("routed_experts") == 0.5 + 2 / 32
    # mxfp4: 4 bits + one 8-bit scale per 32
    assert parse_precision("fp4").bytes_per_param("routed_experts") == 0.5 + 1 / 32
    assert parse_precision("mxfp4").name == "fp4"
    assert parse_precision("int8").bytes_per_param("dense_ffn") == 1.0
    # fp8 with fp32 block scales per 128x128
    assert parse_precision("fp8").bytes_per_param("attention") == pytest.approx(1.000244140625)
    # norms, routers, embedding and LM head stay at >= bf16 under a uniform quantized precision
    for g in ("norms", "router", "embedding", "lm_head"):
        assert parse_precision("int4").bytes_per_param(g) == 2.0
        assert parse_precision("fp32").bytes_per_param(g) == 4.0


def test_mixed_precision() -> None:
    p = parse_precision("mixed:attention=bf16,experts=int4")
    assert p.bytes_per_param("attention") == 2.0
    assert p.bytes_per_param("routed_experts") == 0.5 + 2 / 128
    assert p.bytes_per_param("shared_experts") == 0.5 + 2 / 128
    assert p.bytes_per_param("dense_ffn") == 2.0  # unnamed: default bf16
    q = parse_precision("mixed:experts=fp4,default=fp8,router=int8")
    assert q.bytes_per_param("dense_ffn") == pytest.approx(1 + 4 / 128**2)
    assert q.bytes_per_param("norms") == 2.0  # default fp8 does not push norms below bf16
    assert q.bytes_per_param("router") == 1.0  # an explicit choice is honoured


def test_bytes_follow_precision() -> None:
    spec = catalog.get("mixtral-8x7b")
    c = census(spec, "int4")
    # mixtral experts have no biases: every routed parameter is an int4 matrix weight
    assert c.routed_bytes == c.routed_params * (0.5 + 2 / 128)
    assert c.groups["embedding"].bytes == c.groups["embedding"].params * 2
    b = census(spec, "bf16")
    assert b.total_bytes == 2 * b.total_params
    # one decoded token reads one embedding row, everything else always-on, top_k experts per layer
    expected = b.always_on_bytes - b.groups["embedding"].bytes + 2 * spec.hidden_size
    expected += spec.num_moe_layers * spec.top_k * b.expert_bytes
    assert b.active_bytes == pytest.approx(expected)


def test_gpt_oss_checkpoint_bytes() -> None:
    """gpt-oss stores experts in MXFP4 with bf16 biases; everything else in bf16."""
    name = "gpt-oss-120b"
    spec = catalog.get(name)
    c = census(spec, catalog.entry(name).checkpoint_precision)
    h, i, e, n = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.num_layers
    routed = n * e * (3 * h * i * (0.5 + 1 / 32) + (2 * i + h) * 2)
    assert c.routed_bytes == pytest.approx(routed)
    assert c.always_on_bytes == pytest.approx(2 * c.always_on_params)
    assert 60e9 < c.total_bytes < 70e9  # ~65 GB: fits one 80 GB accelerator, as OpenAI states


def test_mtp_bytes_follow_groups_unless_named() -> None:
    spec = catalog.get("deepseek-v3")
    a = census(spec, "mixed:experts=int4")
    b = census(spec, "mixed:experts=int4,mtp=bf16")
    assert b.groups["mtp"].bytes == 2 * b.groups["mtp"].params
    assert a.groups["mtp"].bytes < 0.5 * b.groups["mtp"].bytes  # its experts are int4 too


@pytest.mark.parametrize(
    "text", ["int3", "", "bf15", "mixed:", "mixed:foo=int4", "mixed:experts=int3", "mixed:experts", "int4:g0"]
)
def test_bad_precision(text: str) -> None:
    with pytest.raises(MoetierError) as e:
        parse_precision(text)
    msg = str(e.value)
    assert "precision" in msg and "\n" not in msg


def test_unknown_precision_lists_valid_forms() -> None:
    with pytest.raises(MoetierError, match="valid forms: bf16"):
        census(catalog.get("olmoe-1b-7b"), "int3")


# ---------------------------------------------------------------------------------------
# JSON and CLI


def test_to_json() -> None:
    c = census(catalog.get("qwen3-30b-a3b"))
    d = json.loads(json.dumps(c.to_json()))
    for k in ("total_params", "active_params", "active_params_excluding_embedding", "always_on_params",
              "always_on_ffn_params", "routed_params", "groups"):
        assert k in d
    assert d["groups"]["routed_experts"]["params"] == c.routed_params
    assert d["groups"]["routed_experts"]["always_on"] is False


def test_cli_census_json(capsys) -> None:
    assert main(["census", "gpt-oss-20b", "--json", "--precision", "checkpoint"]) == 0
    d = json.loads(capsys.readouterr().out)
    c: Census = census(catalog.get("gpt-oss-20b"), catalog.entry("gpt-oss-20b").checkpoint_precision)
    assert d["total_params"] == c.total_params
    assert d["active_params_excluding_embedding"] == c.active_params_excluding_embedding
    assert d["published"]["compare_with"] == "active_params_excluding_embedding"
    assert d["precision"].startswith("mixed:")


def test_cli_census_table(capsys) -> None:
    assert main(["census", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "mtp (apart)" in out
    assert "published 37.00B" in out
    assert "always-on, complete set" in out and "always-on, FFN-only hot set" in out
    assert "3.74B" in out and "17.12B" in out


def test_cli_census_config_path(tmp_path, capsys) -> None:
    cfg = dict(TINY["mixtral"], model_type="mixtral", architectures=["MixtralForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["census", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "published" not in d and d["model"] == tmp_path.name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["census", "no-such-model"], "catalog names: "),
        (["census", "mixtral-8x7b", "--precision", "int3"], "int3"),
        (["census", "BAD_JSON"], "not valid JSON"),
        (["census", "CONFIG", "--precision", "int3"], "int3"),
    ],
)
def test_cli_errors_exit_2_one_line(argv, needle, tmp_path, capsys) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(dict(TINY["olmoe"], model_type="olmoe")))
    argv = [str(bad) if a == "BAD_JSON" else str(good) if a == "CONFIG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetier: error: ") and "\n" not in err
    assert needle in err
