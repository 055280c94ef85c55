"""Weight census: parameters and bytes per group of a :class:`~moetier.spec.ModelSpec`.

The census splits a model's weights into the groups the weight hierarchy cares about:

==================  =========  ===================================================================
group               always-on  contents
==================  =========  ===================================================================
``embedding``       yes        input token embedding table (``V x H``)
``lm_head``         yes        output projection (``H x V``); 0 when tied to the embedding
``attention``       yes        q/k/v/o projections of every layer (GQA) or the MLA projections
                               (``q_a_proj``/``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``,
                               ``kv_b_proj``, ``o_proj``), their biases, attention sinks
``norms``           yes        every RMSNorm weight: per-layer input/post-attention, final norm,
                               MLA ``q_a_layernorm``/``kv_a_layernorm``, q/k norms
``router``          yes        MoE gate weights (``E x H``), router bias, DeepSeek
                               ``e_score_correction_bias``, Qwen2-MoE ``shared_expert_gate``
``dense_ffn``       yes        the FFN of non-MoE layers (all layers of a dense model)
``shared_experts``  yes        shared experts of MoE layers (DeepSeek, Qwen2-MoE, Llama-4)
``routed_experts``  no         routed experts; ``top_k`` of them are read per MoE layer and token
``mtp``             no         DeepSeek multi-token-prediction layers (unique weights only; the
                               embedding and LM head they share are not repeated). Listed apart and
                               NOT part of ``total_params`` (DeepSeek-V3: 671B main + MTP).
==================  =========  ===================================================================

Counting conventions ("active parameters" differ between publishers, see the catalog):

* ``active_params`` counts every always-on group in full, *including the embedding table*, plus
  ``top_k`` routed experts per MoE layer (DeepSeek, Qwen, Mistral, AllenAI, Meta count this way).
* ``active_params_excluding_embedding`` leaves out the embedding lookup but keeps the LM head
  (OpenAI's gpt-oss convention). With tied embeddings the matrix is still read as the LM head, so
  nothing is subtracted.

Bytes: matrices are stored at the group's precision (with group-scale overhead for int4 / fp4 /
block fp8); vectors (biases, norms, sinks, correction biases) stay at >= bf16, as real quantized
checkpoints keep them. ``active_bytes`` is what one decoded token reads (batch 1): the always-on
groups, with the embedding contributing only its looked-up row (unless tied: then the LM head
reads the whole matrix), plus ``top_k`` routed experts per MoE layer. A tied LM head given a
quantized format other than the embedding's (``mixed:...,lm_head=int8:g128``: moetier's
``--quantize-all`` keeps a quantized copy of the tied embedding as the head) is that copy:
``lm_head`` holds its bytes and is what a token reads, the embedding one row
(``Census.head_copy``; the copy is not counted in ``total_params`` / ``active_params``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moetier.errors import MoetierError
from moetier.spec import ModelSpec

GROUPS: tuple[str, ...] = (
    "embedding",
    "lm_head",
    "attention",
    "norms",
    "router",
    "dense_ffn",
    "shared_experts",
    "routed_experts",
    "mtp",
)
# read for every token: everything but the routed experts (and the MTP layers, listed apart)
ALWAYS_ON_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g not in ("routed_experts", "mtp"))

# Groups that real quantized checkpoints keep at >= bf16 unless told otherwise (DeepSeek-V3 FP8
# keeps embeddings, LM head, norms and gates in bf16/fp32; gpt-oss MXFP4 quantizes only the
# experts; GPTQ/AWQ int4 checkpoints keep embeddings and LM head in fp16).
_KEEP_HIGH: frozenset[str] = frozenset({"embedding", "lm_head", "norms", "router"})

# Aliases accepted in "mixed:" precisions.
_ALIASES: dict[str, tuple[str, ...]] = {
    "experts": ("routed_experts", "shared_experts"),
    "routed": ("routed_experts",),
    "shared": ("shared_experts",),
    "ffn": ("dense_ffn", "shared_experts", "routed_experts"),
    "embeddings": ("embedding", "lm_head"),
    "head": ("lm_head",),
    "attn": ("attention",),
    "routers": ("router",),
    "norm": ("norms",),
}

_SIMPLE_FORMATS: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    # fp8 e4m3 with one fp32 scale per 128x128 block (DeepSeek-V3's quantization_config)
    "fp8": 1.0 + 4.0 / (128 * 128),
    # OCP microscaling MXFP4: 4-bit E2M1 elements + one 8-bit E8M0 scale per 32 (gpt-oss experts)
    "fp4": 0.5 + 1.0 / 32,
    "mxfp4": 0.5 + 1.0 / 32,
    # NVFP4: 4-bit elements + one fp8 E4M3 scale per 16 (the per-tensor fp32 scale is negligible)
    "nvfp4": 0.5 + 1.0 / 16,
}
# GGUF block types: bytes per block / weights per block (ggml's block layouts; the same table as
# quant/ggml.py's, which imports torch: tests/gguf/test_gguf_reader.py holds them equal)
GGML_FORMAT_BYTES: dict[str, float] = {
    "q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "q8_0": 34 / 32,
    "q2_k": 84 / 256, "q3_k": 110 / 256, "q4_k": 144 / 256, "q5_k": 176 / 256, "q6_k": 210 / 256,
}
_SIMPLE_FORMATS.update(GGML_FORMAT_BYTES)
_INT_RE = re.compile(r"^int(4|8)(?::g(\d+))?$")
_DEFAULT_INT_GROUP = {4: 128, 8: 0}  # int8: per-output-channel scales (< 0.1 % overhead, ignored)

VALID_FORMS = (
    "bf16, fp16, fp32, fp8, int8, int8:gN, int4 (= int4:g128), int4:gN, fp4 (= mxfp4), nvfp4, "
    "a GGUF block type (" + ", ".join(GGML_FORMAT_BYTES) + "), "
    "or mixed:GROUP=FORMAT,... with GROUP in "
    + ", ".join(GROUPS + tuple(_ALIASES) + ("default",))
)


def _format_bytes(fmt: str) -> float:
    """Bytes per weight of one storage format (incl. scale overhead); raises on unknown."""
    if fmt in _SIMPLE_FORMATS:
        return _SIMPLE_FORMATS[fmt]
    m = _INT_RE.match(fmt)
    if m:
        bits = int(m.group(1))
        g = int(m.group(2)) if m.group(2) is not None else _DEFAULT_INT_GROUP[bits]
        if m.group(2) is not None and g < 1:
            raise MoetierError(f"precision {fmt!r}: group size must be >= 1 (e.g. int4:g128)")
        # one fp16 scale per group of g weights
        return bits / 8 + (2.0 / g if g else 0.0)
    raise MoetierError(f"precision {fmt!r}: unknown format; valid forms: {VALID_FORMS}")


def _canonical(fmt: str) -> str:
    fmt = fmt.strip().lower()
    if fmt == "mxfp4":
        return "fp4"
    if fmt == "int4":
        return "int4:g128"
    return fmt


@dataclass(frozen=True)
class Precision:
    """How each weight group is stored. Build with :func:`parse_precision`."""

    name: str
    formats: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (group, format)
    # (group, bytes per parameter as a file stores it, vectors included): a checkpoint's own
    # bytes where a group mixes formats (a GGUF Q4_K_M's experts: Q4_K and Q6_K tensors)
    stored: tuple[tuple[str, float], ...] = field(default=(), compare=False)

    def format_of(self, group: str) -> str:
        """Storage format of ``group`` (e.g. ``"int4:g128"``); aliases such as ``experts`` allowed."""
        g = _resolve_group(group)
        for name, fmt in self.formats:
            if name == g:
                return fmt
        raise MoetierError(f"precision {self.name!r}: no format for group {group!r}")  # pragma: no cover

    def compute_format(self, group: str) -> str:
        """The format family without the group size (``int4``, ``fp8``, ...): a key of Machine.flops."""
        return self.format_of(group).split(":", 1)[0]

    def _stored(self, group: str) -> float | None:
        g = _resolve_group(group)
        return next((b for name, b in self.stored if name == g), None)

    def bytes_per_param(self, group: str) -> float:
        """Bytes per parameter of a matrix in ``group``, including group-scale overhead."""
        b = self._stored(group)
        return b if b is not None else _format_bytes(self.format_of(group))

    def vector_bytes_per_param(self, group: str) -> float:
        """Bytes per element of the group's vectors (biases, sinks): never below bf16 (a file's
        stored bytes per parameter as they are)."""
        b = self._stored(group)
        return b if b is not None else max(2.0, self.bytes_per_param(group))


def _resolve_group(group: str) -> str:
    if group in GROUPS:
        return group
    if group in _ALIASES:
        return _ALIASES[group][0]
    raise MoetierError(f"unknown weight group {group!r}; groups: {', '.join(GROUPS)}")


def _uniform(fmt: str, group: str) -> str:
    """``fmt`` applied to ``group`` the way real checkpoints do (keep-high groups stay >= bf16)."""
    if group in _KEEP_HIGH and _format_bytes(fmt) < 2.0:
        return "bf16"
    return fmt


def parse_precision(text: str) -> Precision:
    """Parse ``bf16`` | ``fp8`` | ``int8`` | ``int4`` | ``int4:g32`` | ``fp4`` | ``fp32`` |
    ``mixed:attention=bf16,experts=int4,default=fp8``.

    A single format applies to every group, except that embedding, LM head, norms and routers stay
    at >= bf16 (as real quantized checkpoints do). In ``mixed:`` forms, groups named explicitly get
    exactly their format (later entries win), the rest get ``default`` (bf16 if not given) with the
    same keep-high rule.
    """
    if isinstance(text, Precision):
        return text
    if not isinstance(text, str) or not text.strip():
        raise MoetierError(f"precision {text!r}: expected a string; valid forms: {VALID_FORMS}")
    raw = text.strip().lower()
    if not raw.startswith("mixed:"):
        fmt = _canonical(raw)
        _format_bytes(fmt)
        return Precision(name=fmt, formats=tuple((g, _uniform(fmt, g)) for g in GROUPS))

    body = raw[len("mixed:") :]
    explicit: dict[str, str] = {}
    default = "bf16"
    items = [s.strip() for s in body.split(",") if s.strip()]
    if not items:
        raise MoetierError(f"precision {text!r}: 'mixed:' needs GROUP=FORMAT entries; valid forms: {VALID_FORMS}")
    for item in items:
        key, sep, fmt = item.partition("=")
        key, fmt = key.strip(), _canonical(fmt)
        if not sep or not key or not fmt:
            raise MoetierError(f"precision {text!r}: entry {item!r} is not GROUP=FORMAT")
        try:
            _format_bytes(fmt)
        except MoetierError:
            raise MoetierError(
                f"precision {text!r}: unknown format {fmt!r} for {key!r}; valid forms: {VALID_FORMS}"
            ) from None
        if key in ("default", "rest"):
            default = fmt
        elif key in GROUPS:
            explicit[key] = fmt
        elif key in _ALIASES:
            for g in _ALIASES[key]:
                explicit[g] = fmt
        else:
            raise MoetierError(
                f"precision {text!r}: unknown group {key!r}; groups: "
                f"{', '.join(GROUPS + tuple(_ALIASES) + ('default',))}"
            )
    formats = tuple((g, explicit[g] if g in explicit else _uniform(default, g)) for g in GROUPS)
    name = "mixed:" + ",".join(f"{k.strip()}={_canonical(v)}" for k, _, v in (i.partition("=") for i in items))
    return Precision(name=name, formats=formats)


@dataclass(frozen=True)
class GroupCensus:
    name: str  # one of GROUPS
    params: int
    bytes: float
    always_on: bool  # read for every token
    active_params: int  # params counted as active per token (routed_experts: top_k per MoE layer)


@dataclass(frozen=True)
class Census:
    spec: ModelSpec
    precision: Precision
    groups: dict[str, GroupCensus]
    total_params: int  # every group except mtp
    active_params: int  # incl. embedding table and LM head
    active_params_excluding_embedding: int  # LM head kept, embedding lookup left out (OpenAI)
    always_on_params: int  # the complete always-on set (every always-on group)
    always_on_ffn_params: int  # only dense FFN + shared experts (the FFN-only hot set)
    routed_params: int
    always_on_bytes: float
    routed_bytes: float
    total_bytes: float
    active_bytes: float  # bytes read to decode one token at batch 1
    expert_params: int  # ONE routed expert
    expert_bytes: float
    head_copy: bool = False  # a tied LM head kept as its own quantized copy (module doc)

    @property
    def head_is_embedding(self) -> bool:
        """The embedding matrix is read whole per token as the LM head (tied, no copy)."""
        return self.spec.tie_word_embeddings and not self.head_copy

    @property
    def mtp_params(self) -> int:
        return self.groups["mtp"].params

    @property
    def total_params_with_mtp(self) -> int:
        return self.total_params + self.mtp_params

    @property
    def checkpoint_params(self) -> int:
        """Parameters as a DeepSeek-style HF checkpoint stores them: main model + MTP layers, each
        MTP layer holding its own copy of the embedding and LM head (DeepSeek-V3: 671B -> 685B)."""
        s = self.spec
        copies = s.num_mtp_layers * s.vocab_size * s.hidden_size * 2 if s.num_mtp_layers else 0
        return self.total_params_with_mtp + copies

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "model": s.name,
            "family": s.family,
            "precision": self.precision.name,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "active_params_excluding_embedding": self.active_params_excluding_embedding,
            "always_on_params": self.always_on_params,
            "always_on_ffn_params": self.always_on_ffn_params,
            "routed_params": self.routed_params,
            "mtp_params": self.mtp_params,
            "total_params_with_mtp": self.total_params_with_mtp,
            "checkpoint_params": self.checkpoint_params,
            "always_on_bytes": self.always_on_bytes,
            "routed_bytes": self.routed_bytes,
            "total_bytes": self.total_bytes,
            "active_bytes": self.active_bytes,
            "expert_params": self.expert_params,
            "expert_bytes": self.expert_bytes,
            "num_layers": s.num_layers,
            "num_moe_layers": s.num_moe_layers,
            "num_experts": s.num_experts,
            "top_k": s.top_k,
            "labels": {
                "active_params": "always-on groups incl. embedding table and LM head + top_k routed "
                "experts per MoE layer",
                "active_params_excluding_embedding": "active_params minus the embedding lookup "
                "(LM head kept)",
                "always_on_params": "complete always-on set: "
                + " + ".join(g for g in ALWAYS_ON_GROUPS),
                "always_on_ffn_params": "FFN-only hot set: dense_ffn + shared_experts",
                "mtp_params": "multi-token-prediction layers (unique weights), not in total_params",
                "checkpoint_params": "total + MTP layers with their stored copies of embedding and "
                "LM head",
            },
            "groups": {
                name: {
                    "params": g.params,
                    "bytes": g.bytes,
                    "always_on": g.always_on,
                    "active_params": g.active_params,
                    "format": "per group"
                    if name == "mtp" and _mtp_follows_groups(self.precision)
                    else self.precision.format_of(name),
                }
                for name, g in self.groups.items()
            },
        }


# ---------------------------------------------------------------------------------------
# counting (pure functions of the spec)


@dataclass
class _Parts:
    """Matrix and vector element counts of one group (vectors are kept at >= bf16)."""

    matrix: int = 0
    vector: int = 0
    # for mtp: its parts by the group whose precision they take
    by_group: dict[str, _Parts] | None = None

    @property
    def total(self) -> int:
        return self.matrix + self.vector

    def add(self, other: _Parts) -> None:
        self.matrix += other.matrix
        self.vector += other.vector


def _attention_layer(spec: ModelSpec) -> tuple[_Parts, int]:
    """(projection weights + biases + sinks, norm elements inside attention) of one layer."""
    h, nh, nkv = spec.hidden_size, spec.num_heads, spec.num_kv_heads
    p = _Parts()
    norm = 0
    if spec.attention == "mla":
        qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:
            r = spec.q_lora_rank
            p.matrix += h * r + r * nh * qk  # q_a_proj, q_b_proj
            norm += r  # q_a_layernorm
            if spec.attention_bias:
                p.vector += r  # q_a_proj bias
        else:
            p.matrix += h * nh * qk  # q_proj
        kv_a_out = spec.kv_lora_rank + spec.qk_rope_head_dim
        p.matrix += h * kv_a_out  # kv_a_proj_with_mqa
        norm += spec.kv_lora_rank  # kv_a_layernorm
        p.matrix += spec.kv_lora_rank * nh * (spec.qk_nope_head_dim + spec.v_head_dim)  # kv_b_proj
        p.matrix += nh * spec.v_head_dim * h  # o_proj
        if spec.attention_bias:
            p.vector += kv_a_out + h  # kv_a_proj_with_mqa and o_proj biases
        return p, norm
    hd = spec.head_dim
    q, kv = nh * hd, nkv * hd
    p.matrix += h * q + 2 * h * kv + q * h  # q, k, v, o
    if spec.attention_bias:
        p.vector += q + 2 * kv
    if spec.o_proj_bias:
        p.vector += h
    if spec.attention_sinks:
        p.vector += nh
    if spec.qk_norm == "head" and spec.family != "llama4":  # llama4's L2 qk-norm has no weights
        norm += 2 * hd
    elif spec.qk_norm == "full":
        norm += q + kv
    return p, norm


def _router_layer(spec: ModelSpec) -> _Parts:
    p = _Parts(matrix=spec.num_experts * spec.hidden_size)
    if spec.router_bias:
        p.vector += spec.num_experts
    if spec.score_correction_bias:
        p.vector += spec.num_experts
    if spec.shared_expert_gate:
        p.matrix += spec.hidden_size  # Linear(hidden -> 1)
    return p


def _expert_parts(spec: ModelSpec) -> _Parts:
    h, i = spec.hidden_size, spec.expert_intermediate_size
    p = _Parts(matrix=3 * h * i)
    p.vector = spec.expert_params - p.matrix  # gpt_oss biases (2i + h); 0 elsewhere
    return p


def _head_copy(spec: ModelSpec, prec: Precision) -> bool:
    """A tied LM head stored apart: quantized, in another format than the embedding's."""
    head = prec.format_of("lm_head")
    return spec.tie_word_embeddings and head != prec.format_of("embedding") and _format_bytes(head) < 2.0


def _count(spec: ModelSpec, head_copy: bool = False) -> dict[str, _Parts]:
    h, v = spec.hidden_size, spec.vocab_size
    n_moe, n_dense = spec.num_moe_layers, spec.num_dense_layers
    parts = {g: _Parts() for g in GROUPS}
    parts["embedding"].matrix = v * h
    parts["lm_head"].matrix = v * h if head_copy or not spec.tie_word_embeddings else 0

    attn, attn_norm = _attention_layer(spec)
    parts["attention"].matrix = attn.matrix * spec.num_layers
    parts["attention"].vector = attn.vector * spec.num_layers
    layer_norm = 2 * h + attn_norm  # input + post-attention RMSNorm + norms inside attention
    parts["norms"].vector = layer_norm * spec.num_layers + h  # + final norm

    router = _router_layer(spec) if spec.is_moe else _Parts()
    parts["router"].matrix = router.matrix * n_moe
    parts["router"].vector = router.vector * n_moe
    parts["dense_ffn"].matrix = 3 * h * spec.intermediate_size * n_dense
    shared = 3 * h * spec.shared_expert_intermediate_size
    parts["shared_experts"].matrix = shared * n_moe
    expert = _expert_parts(spec)
    parts["routed_experts"].matrix = expert.matrix * spec.num_experts * n_moe
    parts["routed_experts"].vector = expert.vector * spec.num_experts * n_moe

    if spec.num_mtp_layers:
        # DeepSeek MTP module: enorm + hnorm + eh_proj (2H -> H) + one MoE decoder layer +
        # shared_head.norm; embedding and LM head are shared with the main model.
        n = spec.num_mtp_layers
        by = {
            "attention": _Parts(attn.matrix * n, attn.vector * n),
            "norms": _Parts(0, (3 * h + layer_norm) * n),
            "router": _Parts(_router_layer(spec).matrix * n, _router_layer(spec).vector * n)
            if spec.num_experts
            else _Parts(),
            "shared_experts": _Parts(shared * n, 0),
            "routed_experts": _Parts(expert.matrix * spec.num_experts * n, expert.vector * spec.num_experts * n),
            # eh_proj is a dense projection: stored like the attention projections
            "eh_proj": _Parts(2 * h * h * n, 0),
        }
        if not spec.num_experts:  # pragma: no cover - DeepSeek MTP layers are MoE
            by["dense_ffn"] = _Parts(3 * h * spec.intermediate_size * n, 0)
        mtp = parts["mtp"]
        for p in by.values():
            mtp.add(p)
        mtp.by_group = by
    return parts


def _bytes(parts: _Parts, group: str, prec: Precision) -> float:
    if group == "mtp" and parts.by_group is not None and _mtp_follows_groups(prec):
        total = 0.0
        for g, p in parts.by_group.items():
            gg = "attention" if g == "eh_proj" else g
            total += p.matrix * prec.bytes_per_param(gg) + p.vector * prec.vector_bytes_per_param(gg)
        return total
    if group == "norms":
        return parts.vector * prec.bytes_per_param("norms") + parts.matrix * prec.bytes_per_param("norms")
    return parts.matrix * prec.bytes_per_param(group) + parts.vector * prec.vector_bytes_per_param(group)


def _mtp_follows_groups(prec: Precision) -> bool:
    """MTP weights take their sub-groups' formats unless a mixed precision names ``mtp``."""
    return not (prec.name.startswith("mixed:") and re.search(r"(^|[:,])mtp=", prec.name))


def census(spec: ModelSpec, precision: str | Precision = "bf16") -> Census:
    """Per-group parameters and bytes of ``spec`` stored at ``precision``."""
    prec = precision if isinstance(precision, Precision) else parse_precision(precision)
    head_copy = _head_copy(spec, prec)
    tied = spec.tie_word_embeddings and not head_copy  # the embedding matrix is read as the LM head
    parts = _count(spec, head_copy)
    expert = _expert_parts(spec) if spec.num_experts else _Parts()
    expert_bytes = expert.matrix * prec.bytes_per_param("routed_experts") + expert.vector * (
        prec.vector_bytes_per_param("routed_experts")
    )
    routed_active = spec.num_moe_layers * spec.top_k * expert.total

    groups: dict[str, GroupCensus] = {}
    for g in GROUPS:
        p = parts[g]
        always = g in ALWAYS_ON_GROUPS
        if g == "routed_experts":
            active = routed_active
        elif always:
            active = p.total
        else:
            active = 0  # mtp: only used for speculative decoding
        groups[g] = GroupCensus(
            name=g, params=p.total, bytes=_bytes(p, g, prec), always_on=always, active_params=active
        )

    main = [g for g in GROUPS if g != "mtp"]
    copy = groups["lm_head"].params if head_copy else 0  # not a parameter of the model
    total_params = sum(groups[g].params for g in main) - copy
    active_params = sum(groups[g].active_params for g in main) - copy
    emb = groups["embedding"]
    excl = active_params - (0 if spec.tie_word_embeddings else emb.active_params)
    always_on_params = sum(groups[g].params for g in ALWAYS_ON_GROUPS) - copy
    always_on_bytes = sum(groups[g].bytes for g in ALWAYS_ON_GROUPS)
    routed_bytes = groups["routed_experts"].bytes
    # bytes read per decoded token: the embedding contributes one row unless it doubles as LM head
    emb_read = emb.bytes if tied else spec.hidden_size * prec.bytes_per_param("embedding")
    active_bytes = (
        always_on_bytes - emb.bytes + emb_read + spec.num_moe_layers * spec.top_k * expert_bytes
    )
    return Census(
        spec=spec,
        precision=prec,
        groups=groups,
        total_params=total_params,
        active_params=active_params,
        active_params_excluding_embedding=excl,
        always_on_params=always_on_params,
        always_on_ffn_params=groups["dense_ffn"].params + groups["shared_experts"].params,
        routed_params=groups["routed_experts"].params,
        always_on_bytes=always_on_bytes,
        routed_bytes=routed_bytes,
        total_bytes=always_on_bytes + routed_bytes,
        active_bytes=active_bytes,
        expert_params=expert.total,
        expert_bytes=expert_bytes,
        head_copy=head_copy,
    )
