"""ModelSpec parsing: real configs, family quirks, transformers-written configs, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetier import catalog
from moetier.catalog import resolve_model
from moetier.cli import main
from moetier.errors import ConfigError, MoetierError, UnsupportedModelError
from moetier.spec import ARCHITECTURES, MODEL_TYPES, load_spec, spec_from_config

SHARED = Path("/work/shared/data/model-configs")
SHARED_FILES = sorted(SHARED.glob("*.json")) if SHARED.is_dir() else []


@pytest.mark.skipif(not SHARED_FILES, reason=f"{SHARED} not present on this machine")
@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.stem)
def test_every_reference_config_parses(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.family in set(MODEL_TYPES.values())
    assert len(spec.moe_layers) == len(spec.layer_types) == spec.num_layers
    if spec.num_experts:
        assert 1 <= spec.top_k <= spec.num_experts
        assert spec.expert_intermediate_size > 0


@pytest.mark.parametrize("name", catalog.names())
def test_every_catalog_entry_parses(name: str) -> None:
    spec = catalog.get(name)
    assert spec.name == name
    assert spec.raw  # raw config kept
    assert len(spec.moe_layers) == spec.num_layers


def test_deepseek_v3_fields() -> None:
    s = catalog.get("deepseek-v3")
    assert (s.family, s.attention) == ("deepseek_v3", "mla")
    assert s.moe_layers[:3] == (False,) * 3 and all(s.moe_layers[3:])
    assert s.num_moe_layers == 58 and s.num_mtp_layers == 1
    assert (s.q_lora_rank, s.kv_lora_rank, s.head_dim) == (1536, 512, 128)
    assert (s.scoring_func, s.topk_method, s.n_group, s.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert s.score_correction_bias and s.norm_topk_prob and s.routed_scaling_factor == 2.5
    assert s.shared_expert_intermediate_size == 2048 and s.num_shared_experts == 1


def test_kimi_k2_is_deepseek_v3_family() -> None:
    s = catalog.get("kimi-k2")
    assert s.family == "deepseek_v3" and s.model_type == "kimi_k2"
    assert s.num_moe_layers == 60 and s.num_mtp_layers == 0 and s.num_experts == 384


def test_deepseek_v2_lite_fields() -> None:
    s = catalog.get("deepseek-v2-lite")
    assert s.q_lora_rank is None and s.scoring_func == "softmax" and not s.score_correction_bias
    assert s.num_shared_experts == 2 and s.shared_expert_intermediate_size == 2 * 1408
    # DeepSeek's own inference configs write q_lora_rank 0 for "no low-rank Q"
    cfg = dict(catalog.entry("deepseek-v2-lite").config, q_lora_rank=0)
    assert spec_from_config(cfg).q_lora_rank is None


def test_qwen_fields() -> None:
    q2 = catalog.get("qwen1.5-moe-a2.7b")
    assert q2.attention_bias and not q2.o_proj_bias  # q/k/v biased, o_proj not (transformers)
    assert q2.shared_expert_gate and q2.shared_expert_intermediate_size == 5632
    assert q2.layer_types == ("full_attention",) * 24  # use_sliding_window false
    q3 = catalog.get("qwen3-30b-a3b")
    assert q3.qk_norm == "head" and q3.head_dim == 128 and q3.hidden_size // q3.num_heads == 64
    assert not q3.attention_bias and q3.norm_topk_prob


def test_gpt_oss_fields() -> None:
    s = catalog.get("gpt-oss-120b")
    assert s.attention_sinks and s.router_bias and s.attention_bias and s.o_proj_bias
    assert s.layer_types[:2] == ("sliding_attention", "full_attention") and s.sliding_window == 128
    assert s.swiglu_limit == 7.0 and s.top_k == 4 and s.rms_norm_eps == 1e-5
    assert s.expert_params == 3 * 2880 * 2880 + 2 * 2880 + 2880


def test_llama4_fields() -> None:
    scout, mav = catalog.get("llama4-scout"), catalog.get("llama4-maverick")
    assert all(scout.moe_layers) and scout.intermediate_size == 16384
    assert mav.moe_layers == tuple(i % 2 == 1 for i in range(48))  # interleave step 2
    assert mav.num_shared_experts == 1 and mav.shared_expert_intermediate_size == 8192
    assert scout.qk_norm == "head" and mav.qk_norm == "none"
    # transformers' default: every 4th layer is NoPE with full attention, the rest chunked
    assert scout.layer_types[:4] == ("chunked_attention",) * 3 + ("full_attention",)
    assert scout.scoring_func == "sigmoid" and scout.rms_norm_eps == 1e-5


def test_mixtral_sliding_window_applies_to_every_layer() -> None:
    cfg = dict(catalog.entry("mixtral-8x7b").config, sliding_window=4096)
    s = spec_from_config(cfg)
    assert s.sliding_window == 4096 and set(s.layer_types) == {"sliding_attention"}
    assert set(catalog.get("mixtral-8x7b").layer_types) == {"full_attention"}


def test_qwen2_moe_sliding_layers_follow_transformers() -> None:
    cfg = dict(catalog.entry("qwen1.5-moe-a2.7b").config, use_sliding_window=True, max_window_layers=4)
    s = spec_from_config(cfg)
    assert s.layer_types[:5] == ("sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                 "full_attention")


def test_transformers_written_configs_parse() -> None:
    """transformers 5 writes configs with rope_parameters, dtype, num_local_experts (qwen3)..."""
    transformers = pytest.importorskip("transformers")
    for mt, kw in {
        "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, num_hidden_layers=2),
        "deepseek_v3": dict(num_hidden_layers=4),
        "gpt_oss": dict(num_hidden_layers=2),
        "llama4_text": dict(num_hidden_layers=4),
        "qwen2_moe": dict(num_hidden_layers=3),
    }.items():
        hf = transformers.AutoConfig.for_model(mt, **kw)
        s = spec_from_config(hf.to_dict())
        assert s.num_layers == hf.num_hidden_layers
        assert s.rms_norm_eps == hf.rms_norm_eps
        if hasattr(hf, "layer_types") and hf.layer_types is not None:
            assert list(s.layer_types) == list(hf.layer_types)
        if mt == "qwen3_moe":
            assert s.num_experts == 6
        if mt == "deepseek_v3":
            assert s.num_mtp_layers == hf.num_mtp_layers


def test_resolve_model(tmp_path: Path) -> None:
    cfg = catalog.entry("olmoe-1b-7b").config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(tmp_path).name == tmp_path.name
    assert resolve_model(str(tmp_path / "config.json")).hidden_size == 2048
    assert resolve_model("olmoe-1b-7b").name == "olmoe-1b-7b"


# ---------------------------------------------------------------------------------------
# bad inputs: one clear line naming the file and field

BASE = dict(catalog.entry("mixtral-8x7b").config)


def _err(cfg: dict, exc: type = ConfigError) -> str:
    with pytest.raises(exc) as e:
        spec_from_config(cfg, source="my/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("my/config.json")
    return msg


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "num_local_experts", "num_experts_per_tok"])
def test_missing_field(field: str) -> None:
    cfg = {k: v for k, v in BASE.items() if k != field}
    msg = _err(cfg)
    assert f"'{field}'" in msg and "missing" in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "num_local_experts"])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_size(field: str, value: int) -> None:
    msg = _err(dict(BASE, **{field: value}))
    assert f"'{field}'" in msg and ">= 1" in msg


def test_wrong_types() -> None:
    assert "must be an integer" in _err(dict(BASE, hidden_size="4096"))
    assert "must be an integer" in _err(dict(BASE, hidden_size=40.5))
    assert "must be true or false" in _err(dict(BASE, tie_word_embeddings="no"))
    assert "'rope_theta'" in _err(dict(BASE, rope_theta=-1.0))


def test_top_k_larger_than_experts() -> None:
    msg = _err(dict(BASE, num_experts_per_tok=9))
    assert "'num_experts_per_tok'" in msg and "(9)" in msg and "(8)" in msg


def test_kv_heads_must_divide_heads() -> None:
    assert "'num_key_value_heads'" in _err(dict(BASE, num_key_value_heads=5))


def test_bad_layer_lists() -> None:
    q = dict(catalog.entry("qwen3-30b-a3b").config)
    assert "'mlp_only_layers'" in _err(dict(q, mlp_only_layers=[99]))
    assert "'layer_types'" in _err(dict(q, layer_types=["full_attention"]))
    ds = dict(catalog.entry("deepseek-v3").config)
    assert "'n_group'" in _err(dict(ds, n_group=7))


def test_qwen2_moe_requires_shared_expert_width() -> None:
    q = {k: v for k, v in catalog.entry("qwen1.5-moe-a2.7b").config.items() if k != "shared_expert_intermediate_size"}
    assert "'shared_expert_intermediate_size'" in _err(q)


def test_unknown_model_type_lists_supported() -> None:
    msg = _err(dict(BASE, model_type="mamba", architectures=["MambaForCausalLM"]), UnsupportedModelError)
    assert "mamba" in msg and "supported model_type: " in msg and "mixtral" in msg
    assert "MixtralForCausalLM" in msg
    msg = _err(dict(BASE, architectures=["FancyForCausalLM"]), UnsupportedModelError)
    assert "FancyForCausalLM" in msg and "supported architectures" in msg
    cfg = {k: v for k, v in BASE.items() if k not in ("model_type", "architectures")}
    assert "neither 'model_type' nor 'architectures'" in _err(cfg)


def test_every_family_is_supported_by_both_maps() -> None:
    assert set(ARCHITECTURES.values()) <= set(MODEL_TYPES.values())


def test_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_spec(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_spec(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "missing.json")
    with pytest.raises(MoetierError, match="catalog names"):
        resolve_model("not-a-model")


def test_cli_bad_config_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, num_experts_per_tok=20)))
    assert main(["census", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetier: error: ") and "\n" not in err and "num_experts_per_tok" in err


def test_gpt_oss_default_layer_types_alternate() -> None:
    cfg = {k: v for k, v in catalog.entry("gpt-oss-20b").config.items() if k != "layer_types"}
    s = spec_from_config(cfg)
    assert s.layer_types == tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24))
    assert s.layer_types == catalog.get("gpt-oss-20b").layer_types


def test_unknown_layer_type() -> None:
    q = dict(catalog.entry("qwen3-30b-a3b").config)
    msg = _err(dict(q, layer_types=["linear_attention"] * 48))
    assert "'layer_types'" in msg and "linear_attention" in msg and "chunked_attention" in msg
