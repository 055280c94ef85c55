"""ModelSpec: the one parsed view of a Hugging Face ``config.json``.

Everything in moetier (census, planner, runtime, tracer, server) reads a model's shape from
this frozen dataclass, parsed once by :func:`load_spec`. Family quirks are normalised here
so that downstream code never looks at raw config keys again:

* which layers are MoE and which are dense (``first_k_dense_replace``, ``decoder_sparse_step``,
  ``mlp_only_layers``, ``interleave_moe_layer_step``, ...),
* the routing function (softmax / sigmoid, grouped top-k, correction bias, scaling),
* the attention kind (GQA or DeepSeek MLA) and its per-family options.

The raw config is kept in :attr:`ModelSpec.raw` for the rare family-specific extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moetier.errors import ConfigError, UnsupportedModelError

# model_type -> family. Family names are what the runtime registry and census dispatch on.
MODEL_TYPES: dict[str, str] = {
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "gpt_oss": "gpt_oss",
    "llama4": "llama4",
    "llama4_text": "llama4",
    "llama": "llama",
}

# HF `architectures` name -> family.
ARCHITECTURES: dict[str, str] = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
    "Llama4ForConditionalGeneration": "llama4",
    "Llama4ForCausalLM": "llama4",
    "LlamaForCausalLM": "llama",
}


LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def supported_summary() -> str:
    """One line listing the supported model types and architectures (for error messages)."""
    return (
        f"supported model_type: {', '.join(sorted(MODEL_TYPES))}; "
        f"supported architectures: {', '.join(sorted(ARCHITECTURES))}"
    )


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one (MoE or dense) decoder-only language model.

    Sizes are element counts; nothing here knows about bytes or precision (see census).
    ``moe_layers[i]`` tells whether decoder layer ``i`` has a routed-expert FFN.
    """

    name: str  # display name (catalog key or directory name)
    family: str  # one of set(MODEL_TYPES.values())
    model_type: str
    architecture: str

    vocab_size: int
    hidden_size: int
    num_layers: int  # decoder layers, excluding MTP layers
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k/v head width for GQA; v_head_dim for MLA

    # --- FFN ---
    intermediate_size: int  # dense FFN width (dense layers)
    moe_layers: tuple[bool, ...]
    num_experts: int  # routed experts per MoE layer (0 for dense models)
    top_k: int
    expert_intermediate_size: int  # width of one routed expert
    num_shared_experts: int  # shared experts per MoE layer (as separate units)
    shared_expert_intermediate_size: int  # total width of the shared FFN per MoE layer
    shared_expert_gate: bool  # qwen2_moe: sigmoid(Linear(hidden->1)) gate on shared output

    # --- routing ---
    scoring_func: str  # "softmax" | "sigmoid"
    norm_topk_prob: bool
    routed_scaling_factor: float
    topk_method: str  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int
    topk_group: int
    router_bias: bool  # gpt_oss router has a bias
    score_correction_bias: bool  # deepseek_v3 e_score_correction_bias

    # --- attention ---
    attention: str  # "gqa" | "mla"
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool  # q/k/v(/o) projection biases
    o_proj_bias: bool
    qk_norm: str  # "none" | "head" (qwen3, llama4) | "full" (olmoe)
    sliding_window: int | None
    # per layer: "full_attention" | "sliding_attention" (sliding_window) |
    # "chunked_attention" (llama4: attention within blocks of raw["attention_chunk_size"])
    layer_types: tuple[str, ...]
    attention_sinks: bool  # gpt_oss

    # --- misc ---
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str
    swiglu_limit: float | None  # gpt_oss clamped SwiGLU
    num_mtp_layers: int  # DeepSeek multi-token-prediction layers (stored after num_layers)
    torch_dtype: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    quantization: QuantConfig | None = None  # config.json's quantization_config (stored weight format)

    # ----- derived views -----
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down; plus biases for gpt_oss)."""
        h, i = self.hidden_size, self.expert_intermediate_size
        p = 3 * h * i
        if self.family == "gpt_oss":
            p += 2 * i + h  # gate_up bias (2i) + down bias (h)
        return p


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's ``quantization_config``: how its weights are stored (not a request to
    quantize). Which tensors are quantized is read from the files themselves (companion
    tensors ``weight_scale_inv`` / ``_blocks`` + ``_scales`` / ``weight_packed``); this only
    supplies what the files do not say: the FP8 block size and the integer group sizes."""

    method: str  # "fp8" | "mxfp4" | "compressed-tensors"
    fp8_block: tuple[int, int] = (128, 128)  # fp8: weight_block_size [rows, cols]
    # compressed-tensors pack-quantized: (num_bits, group_size or 0 = one group per row, symmetric)
    int_groups: tuple[tuple[int, int, bool], ...] = ()

    @property
    def precision(self) -> str:
        """A census precision string for the stored format (``moetier census --precision``)."""
        if self.method == "fp8":
            return "fp8"
        if self.method == "mxfp4":
            return "mixed:experts=mxfp4,default=bf16"
        bits, group, _ = self.int_groups[0]
        return f"int{bits}:g{group}" if group else f"int{bits}"


QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors")


def _quantization(cfg: Mapping[str, Any], source: str) -> QuantConfig | None:
    q = cfg.get("quantization_config")
    if q is None:
        return None
    where = f"{source}: field 'quantization_config"
    if not isinstance(q, Mapping):
        raise ConfigError(f"{where}' must be an object")
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise ConfigError(f"{where}.quant_method' is {method!r}; moetier reads {', '.join(QUANT_METHODS)} "
                          "(FP8 block-scaled, gpt-oss MXFP4, compressed-tensors pack-quantized)")
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"{where}.fmt' is {fmt!r}, expected 'e4m3'")
        blk = q.get("weight_block_size", [128, 128])
        if not (isinstance(blk, list) and len(blk) == 2 and all(isinstance(b, int) and b > 0 for b in blk)):
            raise ConfigError(f"{where}.weight_block_size' must be two positive integers, got {blk!r}")
        return QuantConfig("fp8", fp8_block=(blk[0], blk[1]))
    if method == "mxfp4":
        return QuantConfig("mxfp4")
    fmt = q.get("format")
    if fmt != "pack-quantized":
        raise ConfigError(f"{where}.format' is {fmt!r}; moetier reads compressed-tensors 'pack-quantized' only")
    groups = q.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigError(f"{where}.config_groups' must be a non-empty object")
    out = []
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, Mapping) else None
        if not isinstance(w, Mapping):
            raise ConfigError(f"{where}.config_groups.{gname}.weights' must be an object")
        bits, gs, typ = w.get("num_bits"), w.get("group_size"), w.get("type", "int")
        strategy = w.get("strategy", "group" if gs else "channel")
        if typ != "int" or bits not in (4, 8):
            raise ConfigError(f"{where}.config_groups.{gname}.weights' is {typ} {bits}-bit; moetier reads "
                              "int 4-bit and 8-bit pack-quantized weights")
        if strategy not in ("group", "channel") or (strategy == "group" and not (isinstance(gs, int) and gs > 0)):
            raise ConfigError(f"{where}.config_groups.{gname}.weights': strategy {strategy!r} group_size {gs!r} "
                              "(expected 'group' with a positive group_size, or 'channel')")
        out.append((bits, gs if strategy == "group" else 0, bool(w.get("symmetric", True))))
    return QuantConfig("compressed-tensors", int_groups=tuple(out))


# ---------------------------------------------------------------------------------------
# parsing


class _Fields:
    """Typed access to a config mapping that names the file and key in every error."""

    def __init__(self, cfg: Mapping[str, Any], source: str):
        self.cfg = cfg
        self.source = source

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{key}' {msg}")

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def int(self, key: str, default: Any = ..., *, min_value: int = 1) -> int:
        v = self.cfg.get(key)
        if v is None:
            if default is ...:
                raise self._err(key, "is missing (expected an integer)")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise self._err(key, f"must be an integer, got {v!r}")
        if v < min_value:
            raise self._err(key, f"must be >= {min_value}, got {v!r}")
        return int(v)

    def float(self, key: str, default: Any = ..., *, positive: bool = True) -> float:
        v = self.cfg.get(key)
        if v is None:
            if default is ...:
                raise self._err(key, "is missing (expected a number)")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._err(key, f"must be a finite number, got {v!r}")
        if positive and v <= 0:
            raise self._err(key, f"must be > 0, got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {v!r}")
        return v

    def str(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        v = self.cfg.get(key)
        if v is None:
            if default is ...:
                raise self._err(key, "is missing (expected a string)")
            return default
        if not isinstance(v, str):
            raise self._err(key, f"must be a string, got {v!r}")
        if choices is not None and v not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return v


def _family_of(cfg: Mapping[str, Any], source: str) -> tuple[str, str, str]:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if archs and not isinstance(archs, list):
        raise ConfigError(f"{source}: field 'architectures' must be a list of strings, got {archs!r}")
    arch = archs[0] if archs else ""
    fam_by_type = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    fam_by_arch = ARCHITECTURES.get(arch) if arch else None
    if model_type is None and not arch:
        raise ConfigError(
            f"{source}: neither 'model_type' nor 'architectures' is set; {supported_summary()}"
        )
    if fam_by_type is None and fam_by_arch is None:
        what = f"model_type {model_type!r}" if model_type else f"architectures {archs!r}"
        raise UnsupportedModelError(f"{source}: unsupported {what}; {supported_summary()}")
    if arch and fam_by_arch is None:
        raise UnsupportedModelError(
            f"{source}: unsupported architectures {archs!r} (model_type {model_type!r}); "
            f"{supported_summary()}"
        )
    family = fam_by_arch or fam_by_type
    assert family is not None
    return family, str(model_type or ""), arch


def spec_from_config(cfg: Mapping[str, Any], name: str = "model", source: str = "config.json") -> ModelSpec:
    """Parse a config mapping (the contents of config.json) into a :class:`ModelSpec`."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at top level, got {type(cfg).__name__}")
    family, model_type, arch = _family_of(cfg, source)
    top = cfg
    if family == "llama4" and isinstance(cfg.get("text_config"), Mapping):
        # Llama-4 multimodal configs nest the language model under text_config.
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k in ("architectures",)}}
        source = f"{source} (text_config)"
    f = _Fields(cfg, source)

    vocab = f.int("vocab_size")
    hidden = f.int("hidden_size")
    n_layers = f.int("num_hidden_layers")
    n_heads = f.int("num_attention_heads")
    n_kv = f.int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise ConfigError(
            f"{source}: field 'num_key_value_heads' ({n_kv}) must divide num_attention_heads ({n_heads})"
        )
    head_dim = f.int("head_dim", hidden // n_heads)
    inter = f.int("intermediate_size")
    act = f.str("hidden_act", "silu")

    # defaults for the routing / attention extras
    scoring, norm_topk, scale = "softmax", False, 1.0
    topk_method, n_group, topk_group = "greedy", 1, 1
    router_bias = corr_bias = False
    attention, q_lora, kv_lora, nope, rope_d, v_d = "gqa", None, 0, 0, 0, head_dim
    attn_bias = f.bool("attention_bias", False)
    o_bias = attn_bias
    qk_norm = "none"
    sliding: int | None = None
    sinks = False
    swiglu_limit: float | None = None
    n_mtp = 0
    default_layer_types: tuple[str, ...] | None = None
    shared_n, shared_inter, shared_gate = 0, 0, False
    n_exp, top_k, exp_inter = 0, 0, 0
    moe_layers = [False] * n_layers

    if family in ("deepseek_v2", "deepseek_v3"):
        n_exp = f.int("n_routed_experts", 0, min_value=0)
        exp_inter = f.int("moe_intermediate_size") if n_exp else 0
        shared_n = f.int("n_shared_experts", 0, min_value=0) if n_exp else 0
        shared_inter = shared_n * exp_inter
        first_dense = f.int("first_k_dense_replace", 0, min_value=0)
        freq = f.int("moe_layer_freq", 1)
        moe_layers = [bool(n_exp) and i >= first_dense and i % freq == 0 for i in range(n_layers)]
        default_scoring = "sigmoid" if family == "deepseek_v3" else "softmax"
        scoring = f.str("scoring_func", default_scoring, ("softmax", "sigmoid"))
        norm_topk = f.bool("norm_topk_prob", family == "deepseek_v3")
        scale = f.float("routed_scaling_factor", 1.0)
        default_method = "noaux_tc" if family == "deepseek_v3" else "greedy"
        topk_method = f.str(
            "topk_method", default_method, ("greedy", "group_limited_greedy", "noaux_tc")
        )
        n_group = f.int("n_group", 1)
        topk_group = f.int("topk_group", 1)
        corr_bias = topk_method == "noaux_tc"
        attention = "mla"
        # null (HF) or 0 (DeepSeek's own inference configs) both mean "no low-rank Q projection"
        q_lora = f.int("q_lora_rank", None, min_value=0) or None
        kv_lora = f.int("kv_lora_rank")
        nope = f.int("qk_nope_head_dim")
        rope_d = f.int("qk_rope_head_dim")
        v_d = f.int("v_head_dim")
        head_dim = v_d
        n_mtp = f.int("num_nextn_predict_layers", f.int("num_mtp_layers", 0, min_value=0), min_value=0)
        if n_exp and n_exp % n_group:
            raise ConfigError(f"{source}: field 'n_group' ({n_group}) must divide n_routed_experts ({n_exp})")
        if topk_group > n_group:
            raise ConfigError(f"{source}: field 'topk_group' ({topk_group}) exceeds n_group ({n_group})")
    elif family in ("qwen2_moe", "qwen3_moe"):
        # transformers 5.x writes qwen3_moe configs with num_local_experts instead of num_experts
        n_exp = f.int("num_experts", f.int("num_local_experts", 0, min_value=0), min_value=0)
        exp_inter = f.int("moe_intermediate_size") if n_exp else 0
        step = f.int("decoder_sparse_step", 1)
        mlp_only_raw = cfg.get("mlp_only_layers") or []
        if not isinstance(mlp_only_raw, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in mlp_only_raw
        ):
            raise ConfigError(
                f"{source}: field 'mlp_only_layers' must be a list of layer indices in [0, {n_layers})"
            )
        mlp_only = set(mlp_only_raw)
        moe_layers = [
            bool(n_exp) and i not in mlp_only and (i + 1) % step == 0 for i in range(n_layers)
        ]
        norm_topk = f.bool("norm_topk_prob", False)
        if family == "qwen2_moe":
            # every Qwen2-MoE layer has a gated shared expert (transformers builds it unconditionally)
            shared_inter = f.int("shared_expert_intermediate_size", min_value=0) if n_exp else 0
            shared_n = 1 if shared_inter else 0
            shared_gate = bool(shared_inter)
            attn_bias, o_bias = f.bool("qkv_bias", True), False  # q/k/v biased, o_proj not
            if f.bool("use_sliding_window", False):
                sliding = f.int("sliding_window", None)
                # transformers' Qwen2MoeConfig: odd-numbered layers below max_window_layers slide
                max_window = f.int("max_window_layers", 28, min_value=0)
                default_layer_types = tuple(
                    "sliding_attention" if (i + 1) % 2 and i < max_window else "full_attention"
                    for i in range(n_layers)
                )
        else:
            qk_norm = "head"
            attn_bias = o_bias = f.bool("attention_bias", False)
            if f.bool("use_sliding_window", False):
                sliding = f.int("sliding_window", None)
    elif family == "mixtral":
        n_exp = f.int("num_local_experts")
        exp_inter = inter
        moe_layers = [True] * n_layers
        norm_topk = True  # mixtral renormalises the top-k softmax weights
        sliding = f.int("sliding_window", None)
    elif family == "olmoe":
        n_exp = f.int("num_experts")
        exp_inter = inter
        moe_layers = [True] * n_layers
        norm_topk = f.bool("norm_topk_prob", False)
        qk_norm = "full"
    elif family == "gpt_oss":
        n_exp = f.int("num_local_experts")
        exp_inter = inter
        moe_layers = [True] * n_layers
        norm_topk = True  # softmax over the top-k router logits
        router_bias = True
        attn_bias = o_bias = f.bool("attention_bias", True)
        sliding = f.int("sliding_window", None)
        # transformers' GptOssConfig default: even layers slide, odd layers attend fully
        default_layer_types = tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
        )
        sinks = True
        swiglu_limit = f.float("swiglu_limit", 7.0)
    elif family == "llama4":
        n_exp = f.int("num_local_experts")
        exp_inter = inter
        inter = f.int("intermediate_size_mlp", inter)
        step = f.int("interleave_moe_layer_step", 1)
        explicit = cfg.get("moe_layers")
        if explicit is not None:
            if not isinstance(explicit, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in explicit
            ):
                raise ConfigError(
                    f"{source}: field 'moe_layers' must be a list of layer indices in [0, {n_layers})"
                )
            ids = set(explicit)
            moe_layers = [i in ids for i in range(n_layers)]
        else:
            moe_layers = [(i + 1) % step == 0 for i in range(n_layers)]
        shared_n, shared_inter = 1, exp_inter  # one always-on shared expert per MoE layer
        scoring = "sigmoid"
        # Llama-4's q/k norm is a weightless L2 norm per head (Llama4TextL2Norm), on RoPE layers only
        qk_norm = "head" if f.bool("use_qk_norm", True) else "none"
        # transformers' Llama4TextConfig: no_rope_layers[i] == 1 means layer i uses RoPE and
        # chunked attention; every no_rope_layer_interval-th layer is NoPE with full attention.
        interval = f.int("no_rope_layer_interval", 4)
        no_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        if not isinstance(no_rope, list) or len(no_rope) != n_layers:
            raise ConfigError(f"{source}: field 'no_rope_layers' must list one 0/1 entry per layer ({n_layers})")
        default_layer_types = tuple("chunked_attention" if r else "full_attention" for r in no_rope)
    elif family == "llama":
        attn_bias = o_bias = f.bool("attention_bias", False)
    else:  # pragma: no cover - guarded by _family_of
        raise UnsupportedModelError(f"{source}: unsupported family {family}")

    if n_exp:
        # gpt_oss configs also carry the original name `experts_per_token`
        key = "experts_per_token" if not f.has("num_experts_per_tok") and f.has("experts_per_token") else None
        top_k = f.int(key or "num_experts_per_tok")
        if top_k > n_exp:
            raise ConfigError(
                f"{source}: field 'num_experts_per_tok' ({top_k}) is larger than the number of "
                f"routed experts ({n_exp})"
            )
    else:
        moe_layers = [False] * n_layers

    layer_types_raw = cfg.get("layer_types")
    if layer_types_raw is not None:
        if not isinstance(layer_types_raw, list) or len(layer_types_raw) != n_layers:
            raise ConfigError(
                f"{source}: field 'layer_types' must list one entry per layer ({n_layers})"
            )
        layer_types = tuple(str(t) for t in layer_types_raw)
        bad = sorted(set(layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(
                f"{source}: field 'layer_types' has unsupported entries {bad}; expected {', '.join(LAYER_TYPES)}"
            )
    elif default_layer_types is not None:
        layer_types = default_layer_types
    elif sliding is not None:  # mixtral, qwen3_moe: every layer slides
        layer_types = ("sliding_attention",) * n_layers
    else:
        layer_types = ("full_attention",) * n_layers

    rope_scaling = cfg.get("rope_scaling")
    # transformers 5.x writes rope_theta and the scaling into one `rope_parameters` object
    rope_params = cfg.get("rope_parameters")
    if rope_params is not None and not isinstance(rope_params, Mapping):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object or null")
    rope_params = dict(rope_params or {})
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null")
    default_max_pos = 4096
    return ModelSpec(
        name=name,
        family=family,
        model_type=model_type,
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        moe_layers=tuple(moe_layers),
        num_experts=n_exp,
        top_k=top_k,
        expert_intermediate_size=exp_inter,
        num_shared_experts=shared_n,
        shared_expert_intermediate_size=shared_inter,
        shared_expert_gate=shared_gate,
        scoring_func=scoring,
        norm_topk_prob=norm_topk,
        routed_scaling_factor=scale,
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        router_bias=router_bias,
        score_correction_bias=corr_bias,
        attention=attention,
        q_lora_rank=q_lora,
        kv_lora_rank=kv_lora,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_d,
        v_head_dim=v_d,
        attention_bias=attn_bias,
        o_proj_bias=o_bias,
        qk_norm=qk_norm,
        sliding_window=sliding,
        layer_types=layer_types,
        attention_sinks=sinks,
        rope_theta=f.float("rope_theta", _Fields(rope_params, source).float("rope_theta", 10000.0)),
        rope_scaling=MappingProxyType(dict(rope_scaling)) if rope_scaling else None,
        max_position_embeddings=f.int("max_position_embeddings", default_max_pos),
        # defaults follow transformers' config classes per family
        rms_norm_eps=f.float(
            "rms_norm_eps", 1e-5 if family in ("mixtral", "olmoe", "gpt_oss", "llama4") else 1e-6
        ),
        tie_word_embeddings=_Fields(top, source).bool(
            "tie_word_embeddings", f.bool("tie_word_embeddings", False)
        ),
        hidden_act=act,
        swiglu_limit=swiglu_limit,
        num_mtp_layers=n_mtp,
        torch_dtype=cfg.get("torch_dtype") or top.get("torch_dtype") or cfg.get("dtype"),
        raw=MappingProxyType(dict(top)),
        quantization=_quantization(top, source),
    )


def load_spec(path: str | Path, name: str | None = None) -> ModelSpec:
    """Parse ``config.json`` (a file, or a model directory holding one) into a ModelSpec; a
    ``.gguf`` file's metadata is parsed by :mod:`moetier.weights.gguf_io`."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        from moetier.weights.gguf_io import load_gguf_spec

        return load_gguf_spec(p, name)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path}: no such file (expected a config.json or a model directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    display = name or (p.name if p.is_dir() else p.stem)
    return spec_from_config(cfg, name=display, source=str(cfg_path))
