"""System-level (cluster) planner: N devices, expert parallelism, and the triangle.

Inference throughput is bounded by the compute / memory / communication triangle. Once the
hot weights sit close to the compute (memory stops binding), the expert-parallel all-to-all
across cards, trays and racks binds instead. This module models one serving *step* (one forward
pass) of one device of an N-device deployment and says which side of the triangle binds.

Model (per device, per step; every term is printed by ``--explain``):

* Layout: ``devices = dp * tp`` for attention (data parallel groups of ``tp`` tensor-parallel
  ranks); the routed experts are spread over expert-parallel groups of ``ep`` devices
  (``devices / ep`` full copies). ``redundant_experts`` extra slots hold copies of hot experts.
* Work of the step: decode steps carry ``batch`` requests x ``(1 + mtp_tokens)`` tokens at an
  average KV length ``context``; prefill steps carry ``batch`` new tokens of prompts of
  ``context`` tokens of which ``cached_fraction`` come from a KV cache (not computed).
* Each operation (attention projections, attention core, routed experts, shared experts, dense
  FFNs, LM head, routers) is ``max(padded FLOPs / compute rate, bytes / memory rate, kernel
  floor)`` at its own weight group's precision (FP4 tensor cores where the chip has them); its
  time is attributed to compute, memory or latency (launch floor) by the largest term.
* Attention core: MLA-aware. Decode uses the absorbed form over the latent cache
  (``kv_lora_rank + qk_rope_head_dim`` values per token per layer); prefill uses the expanded
  heads (``qk_nope + qk_rope`` for scores, ``v_head`` for values). GQA caches K and V of
  ``num_kv_heads`` heads. Sliding-window layers attend to at most the window.
* All-to-all per MoE layer: dispatch (FP8 + one fp32 scale per 128 values, or BF16) and combine
  (BF16 or FP8) of ``top_k`` token-expert pairs. ``direct`` mode (decode, DeepEP low-latency
  style) sends each pair to its device: a fraction ``(S-1)/ep`` stays inside the scale-up domain
  of ``S`` devices, ``(ep-S)/ep`` crosses scale-out. ``dedup`` mode (prefill, DeepEP normal
  style) sends a token once per distinct remote domain over scale-out, then forwards it over
  scale-up; node-limited group routing (DeepSeek: top-4 of 8 groups) bounds the domains.
  The slower of the two link classes sets the time, plus a fixed latency per dispatch/combine.
* Load imbalance: the slowest device sets the step. Routed-expert FLOPs and all-to-all bytes
  are scaled by ``imbalance`` = max/mean device load, from :mod:`moetier.planner.eplb` (a
  routing profile and a replication budget) times the sampling noise of a finite batch.
* Two-batch overlap: per MoE layer, ``overlap`` x min(local work, all-to-all) is hidden; the
  weights are read once per micro-batch.
* Memory capacity: weights (always-on, attention / tp, local expert slots) + KV cache +
  a reserve must fit the compute tier, or the layout is infeasible.

Efficiency: per-chip and per-fabric constants from :mod:`moetier.planner.efficiency` (cited:
GEMM efficiency by precision and tensor-core tile, attention and HBM efficiency, kernel floors,
link efficiency and latency floors) and a few global factors fitted to published measurements
in :mod:`moetier.planner.calibration` (see :mod:`moetier.planner.published`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any

from moetier.errors import MoetierError
from moetier.planner import calibration as calib
from moetier.planner import eplb
from moetier.planner.calibration import Calibration, calibration_for
from moetier.planner.census import Census, census
from moetier.planner.efficiency import ChipEff, Fabrics, chip_eff, collective_s, compute_key, fabrics, padded_rows
from moetier.planner.hardware import Machine
from moetier.spec import ModelSpec

PHASES = ("decode", "prefill")
A2A_MODES = ("auto", "direct", "dedup")
RESERVE_FRACTION = 0.08  # of the compute tier: activations, all-to-all buffers, allocator slack


class ClusterError(MoetierError):
    """A cluster layout parameter is invalid."""


# ---------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class Layout:
    """One deployment of one phase (SI units; counts are per device unless named otherwise)."""

    devices: int
    phase: str = "decode"
    ep: int | None = None  # default: devices
    dp: int | None = None  # default: devices / tp
    tp: int = 1
    batch: float = 64.0  # decode: requests per device; prefill: new tokens per device per step
    context: float = 4096.0  # decode: average KV length; prefill: prompt length
    cached_fraction: float = 0.0  # prefill: share of prompt tokens served from a KV cache
    redundant_experts: int = 0
    imbalance: float | None = None  # max/mean expert load per device (total); None: modelled
    placement_imbalance: float | None = None  # from a routing profile + placement (noise added)
    routing_zipf: float = 0.0  # routing skew when neither is given (0 = uniform)
    two_batch_overlap: bool = True
    dispatch_dtype: str = "fp8"
    combine_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    attention_dtype: str = "bf16"  # the attention core (QK^T, PV); projections follow the census
    mtp_tokens: int = 0  # decode: draft tokens verified per step
    mtp_acceptance: float = 0.0
    a2a: str = "auto"

    def resolved(self) -> Layout:
        ep = self.ep if self.ep is not None else self.devices
        tp = self.tp
        dp = self.dp if self.dp is not None else max(1, self.devices // max(tp, 1))
        return replace(self, ep=ep, dp=dp)


def _positive(name: str, v: float, integer: bool = False) -> None:
    if v is None or not math.isfinite(v) or v <= 0 or (integer and int(v) != v):
        kind = "a positive integer" if integer else "a positive number"
        raise ClusterError(f"{name} must be {kind}, got {v!r}")


def validate(layout: Layout, spec: ModelSpec, machine: Machine) -> Layout:
    """Fill the defaults (ep, dp) and check every parameter; raises ClusterError naming it."""
    if layout.tp is not None and layout.tp > 0 and layout.devices > 0 and layout.devices % layout.tp:
        raise ClusterError(f"tp ({layout.tp}) must divide devices ({layout.devices})")
    if layout.ep is None and spec.is_moe and layout.devices > spec.num_experts + layout.redundant_experts:
        # more devices than expert slots: several expert-parallel groups, each a full copy
        slots = spec.num_experts + layout.redundant_experts
        ep = max(d for d in range(1, slots + 1) if layout.devices % d == 0)
        layout = replace(layout, ep=ep)
    lay = layout.resolved()
    _positive("devices", lay.devices, True)
    _positive("tp", lay.tp, True)
    _positive("dp", lay.dp, True)
    _positive("ep", lay.ep, True)
    if lay.phase not in PHASES:
        raise ClusterError(f"phase must be one of {', '.join(PHASES)}, got {lay.phase!r}")
    if lay.dp * lay.tp != lay.devices:
        raise ClusterError(f"dp x tp must equal devices: {lay.dp} x {lay.tp} != {lay.devices}")
    if lay.devices % lay.ep:
        raise ClusterError(f"ep ({lay.ep}) must divide devices ({lay.devices})")
    _positive("batch-per-device", lay.batch)
    _positive("context", lay.context)
    if not 0.0 <= lay.cached_fraction < 1.0:
        raise ClusterError(f"cached-fraction must be in [0, 1), got {lay.cached_fraction}")
    if lay.redundant_experts < 0:
        raise ClusterError(f"redundant-experts must be >= 0, got {lay.redundant_experts}")
    for name, v in (("imbalance", lay.imbalance), ("placement imbalance", lay.placement_imbalance)):
        if v is not None and not (math.isfinite(v) and v >= 1.0):
            raise ClusterError(f"{name} (max/mean load) must be >= 1, got {v}")
    if not math.isfinite(lay.routing_zipf) or lay.routing_zipf < 0:
        raise ClusterError(f"zipf must be >= 0, got {lay.routing_zipf}")
    if lay.mtp_tokens < 0 or not 0.0 <= lay.mtp_acceptance <= 1.0:
        raise ClusterError("mtp-tokens must be >= 0 and mtp-acceptance in [0, 1]")
    for name, v, ok in (("dispatch-dtype", lay.dispatch_dtype, ("fp8", "bf16", "fp4")),
                        ("combine-dtype", lay.combine_dtype, ("fp8", "bf16")),
                        ("kv-dtype", lay.kv_dtype, ("fp8", "bf16", "fp16", "fp32")),
                        ("a2a", lay.a2a, A2A_MODES)):
        if v not in ok:
            raise ClusterError(f"{name} must be one of {', '.join(ok)}, got {v!r}")
    if not spec.is_moe and lay.ep != 1:
        lay = replace(lay, ep=1)
    if spec.is_moe and lay.ep > spec.num_experts + lay.redundant_experts:
        raise ClusterError(
            f"ep ({lay.ep}) exceeds the expert slots ({spec.num_experts} experts + "
            f"{lay.redundant_experts} redundant): some devices would hold no expert"
        )
    if lay.ep > 1 and lay.ep > _domain(machine) and not machine.scale_out_bw:
        raise ClusterError(
            f"machine {machine.name!r} has no scale-out bandwidth, so ep ({lay.ep}) cannot exceed its "
            f"scale-up domain ({_domain(machine)}); give --ep <= {_domain(machine)} or a machine file "
            "with scale_out_bw"
        )
    return lay


def _domain(machine: Machine) -> int:
    return int(machine.scale_up_domain or machine.devices_per_node or 1)


_DTYPE_BYTES = {"fp8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}


# ---------------------------------------------------------------------------------------
# model shape (from the census: one implementation of parameter counting)


@dataclass(frozen=True)
class Shape:
    """Per-layer and per-token quantities of one model at one precision."""

    name: str
    hidden: int
    num_layers: int
    n_moe: int
    n_dense: int
    top_k: int
    num_experts: int
    n_group: int
    topk_group: int
    attn_params: float  # all layers
    attn_bytes: float
    dense_params: float  # all dense layers
    dense_bytes: float
    shared_params: float  # all MoE layers
    shared_bytes: float
    expert_params: float  # one expert
    expert_bytes: float
    head_params: float
    head_bytes: float
    router_params: float  # all MoE layers
    other_always_on_bytes: float  # embedding, norms, routers
    always_on_bytes: float
    mtp_bytes: float
    attention: str
    heads: int
    kv_heads: int
    head_dim: int
    kv_lora: int
    qk_nope: int
    qk_rope: int
    v_head: int
    windows: tuple[int | None, ...]  # per layer: sliding window or None
    fmt_attn: str
    fmt_expert: str
    fmt_dense: str
    fmt_head: str
    fmt_shared: str


_SHAPES: dict[tuple[int, str], tuple[ModelSpec, Shape]] = {}


def model_shape(spec: ModelSpec, precision: str = "fp8") -> Shape:
    """The :class:`Shape` of ``spec`` at ``precision`` (cached per spec object)."""
    hit = _SHAPES.get((id(spec), precision))
    if hit is not None and hit[0] is spec:
        return hit[1]
    shape = _model_shape(spec, precision)
    if len(_SHAPES) > 64:
        _SHAPES.clear()
    _SHAPES[(id(spec), precision)] = (spec, shape)
    return shape


def _model_shape(spec: ModelSpec, precision: str) -> Shape:
    c: Census = census(spec, precision)
    g = c.groups
    prec = c.precision
    windows = tuple(
        spec.sliding_window if t == "sliding_attention" and spec.sliding_window else None
        for t in spec.layer_types
    )
    head = g["lm_head"] if g["lm_head"].params else g["embedding"]
    return Shape(
        name=spec.name, hidden=spec.hidden_size, num_layers=spec.num_layers,
        n_moe=spec.num_moe_layers, n_dense=spec.num_dense_layers, top_k=spec.top_k,
        num_experts=spec.num_experts, n_group=max(1, spec.n_group), topk_group=max(1, spec.topk_group),
        attn_params=g["attention"].params, attn_bytes=g["attention"].bytes,
        dense_params=g["dense_ffn"].params, dense_bytes=g["dense_ffn"].bytes,
        shared_params=g["shared_experts"].params, shared_bytes=g["shared_experts"].bytes,
        expert_params=c.expert_params, expert_bytes=c.expert_bytes,
        head_params=head.params, head_bytes=head.bytes,
        router_params=g["router"].params,
        other_always_on_bytes=g["embedding"].bytes + g["lm_head"].bytes + g["norms"].bytes + g["router"].bytes,
        always_on_bytes=c.always_on_bytes, mtp_bytes=g["mtp"].bytes,
        attention=spec.attention, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, kv_lora=spec.kv_lora_rank, qk_nope=spec.qk_nope_head_dim,
        qk_rope=spec.qk_rope_head_dim, v_head=spec.v_head_dim, windows=windows,
        fmt_attn=prec.compute_format("attention"), fmt_expert=prec.compute_format("routed_experts"),
        fmt_dense=prec.compute_format("dense_ffn"), fmt_head=prec.compute_format("lm_head"),
        fmt_shared=prec.compute_format("shared_experts"),
    )


def kv_bytes_per_token(shape: Shape, kv_dtype: str = "bf16") -> float:
    """KV-cache bytes per token over all layers (MLA: latent + rope key; GQA: K and V)."""
    b = _DTYPE_BYTES[kv_dtype]
    if shape.attention == "mla":
        per_layer = (shape.kv_lora + shape.qk_rope) * b
    else:
        per_layer = 2 * shape.kv_heads * shape.head_dim * b
    return per_layer * shape.num_layers


def _attended(ctx: float, window: int | None) -> float:
    return min(ctx, window) if window else ctx


def _core_flops_per_token(shape: Shape, ctx_by_layer: float, phase: str) -> float:
    """Attention-core FLOPs of one token attending to ``ctx`` positions, summed over layers."""
    total = 0.0
    for w in shape.windows:
        L = _attended(ctx_by_layer, w)
        if shape.attention == "mla":
            if phase == "decode":  # absorbed: scores over latent+rope, values in the latent space
                per = 2 * shape.heads * ((shape.kv_lora + shape.qk_rope) + shape.kv_lora) * L
            else:  # expanded heads
                per = 2 * shape.heads * ((shape.qk_nope + shape.qk_rope) + shape.v_head) * L
        else:
            per = 2 * shape.heads * (2 * shape.head_dim) * L
        total += per
    return total


# ---------------------------------------------------------------------------------------
# routing geometry


def _p_domain_hit(n_domains: int, shape: Shape) -> float:
    """Probability that one token's top-k picks touch a given domain of the EP group."""
    k = shape.top_k
    if n_domains <= 1:
        return 1.0
    if shape.n_group > 1 and shape.topk_group < shape.n_group and n_domains <= shape.n_group \
            and shape.n_group % n_domains == 0:
        # node-limited group routing: top-`topk_group` groups of `n_group`, groups laid out on
        # domains in order (g groups per domain)
        g = shape.n_group // n_domains
        miss = math.comb(shape.n_group - g, shape.topk_group) / math.comb(shape.n_group, shape.topk_group)
        return 1.0 - miss
    return 1.0 - (1.0 - 1.0 / n_domains) ** k


def _distinct(n: int, k: int) -> float:
    """Expected distinct bins hit by k uniform picks among n bins."""
    return n * (1.0 - (1.0 - 1.0 / n) ** k) if n > 0 else 0.0


# ---------------------------------------------------------------------------------------
# the step model


@dataclass(frozen=True)
class Op:
    name: str
    flops: float  # useful FLOPs (what the model computes)
    bytes: float
    flop_rate: float  # sustained FLOP/s used
    mem_rate: float  # sustained bytes/s used
    layers: int  # how many layers this per-layer op is summed over (info)
    weight_bytes: float = 0.0  # the part of ``bytes`` that is weights (may sit in a hot tier)
    hot_fraction: float = 0.0  # share of those weights held in the hot (SRAM) tier
    hot_rate: float = 0.0  # sustained bytes/s of the hot tier
    padded_flops: float = 0.0  # FLOPs the tensor cores execute (token rows padded to the tile)
    floor_s: float = 0.0  # kernel-launch floor of this op over the step (kernels x layers x micro-batches)
    precision: str = ""  # rate family of the compute (fp4 / fp8 / int8 / bf16)

    @cached_property  # frozen: computed once (the sweep reads these many times)
    def compute_s(self) -> float:
        f = max(self.flops, self.padded_flops)
        return f / self.flop_rate if f else 0.0

    @cached_property
    def memory_s(self) -> float:
        if not self.bytes:
            return 0.0
        hot = self.weight_bytes * self.hot_fraction if self.hot_rate else 0.0
        return (self.bytes - hot) / self.mem_rate + (hot / self.hot_rate if hot else 0.0)

    @cached_property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.floor_s)

    @cached_property
    def bound(self) -> str:
        if self.floor_s > max(self.compute_s, self.memory_s):
            return "latency"
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class CommTerm:
    """All-to-all of one MoE layer (per device, summed over micro-batches)."""

    pairs_per_token: float
    dispatch_bytes_per_pair: float
    combine_bytes_per_pair: float
    scale_out_bytes: float
    scale_up_bytes: float
    scale_out_s: float
    scale_up_s: float
    latency_s: float
    mode: str
    frac_inside: float  # share of remote pair traffic that stays inside the scale-up domain
    fabric: str = ""  # the link class whose latency floor applies

    @property
    def time_s(self) -> float:
        return max(self.scale_out_s, self.scale_up_s) + self.latency_s

    @property
    def link(self) -> str:
        return "scale-out" if self.scale_out_s >= self.scale_up_s else "scale-up"


@dataclass
class ClusterResult:
    model: str
    machine: str
    layout: Layout
    calibration: Calibration
    tokens_per_step: float  # per device: output tokens (decode) / input tokens incl. cache hits (prefill)
    computed_tokens_per_step: float
    step_s: float
    compute_s: float
    memory_s: float
    comm_s: float  # all-to-all + TP collectives, before overlap
    hidden_s: float  # hidden by two-batch overlap
    imbalance: float
    ops: list[Op]
    comm: CommTerm | None
    tp_comm_s: float
    weight_bytes: float
    kv_bytes: float
    capacity_bytes: float
    feasible: bool
    devices_per_node: int
    notes: list[str] = field(default_factory=list)
    latency_s: float = 0.0  # operations bound by their kernel-launch floor
    chip: ChipEff | None = None
    fabrics: Fabrics | None = None
    micro_batches: int = 1  # 2 with two-batch overlap (needs >= 2 requests per device or TP group)

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_node(self) -> float:
        return self.tokens_per_s_per_device * self.devices_per_node

    @property
    def tokens_per_s_per_user(self) -> float:
        lay = self.layout
        if lay.phase == "decode":
            return (1.0 + lay.mtp_tokens * lay.mtp_acceptance) / self.step_s
        # prefill: prompt tokens per second seen by one request (its prompt over its TTFT)
        return lay.context / self.ttft_s

    @property
    def ttft_s(self) -> float:
        lay = self.layout
        if lay.phase != "prefill":
            return self.step_s
        new = lay.context * (1.0 - lay.cached_fraction)
        return self.step_s * max(1.0, math.ceil(new / lay.batch))

    @property
    def shares(self) -> dict[str, float]:
        parts = (("compute", self.compute_s), ("memory", self.memory_s), ("communication", self.comm_s),
                 ("latency", self.latency_s))
        tot = sum(v for _, v in parts)
        return {k: v / tot for k, v in parts}

    @property
    def bottleneck(self) -> str:
        if not self.feasible:
            return "capacity"
        t = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comm_s,
             "latency": self.latency_s}
        return max(t, key=t.__getitem__)

    @property
    def band(self) -> tuple[float, float]:
        """Uncertainty band of tokens/s per node (leave-one-chip-out error of the calibration)."""
        return calib.band(self.tokens_per_s_per_node)

    def to_json(self) -> dict[str, Any]:
        lay = self.layout
        lo, hi = self.band
        out = {
            "model": self.model,
            "machine": self.machine,
            "phase": lay.phase,
            "devices": lay.devices, "ep": lay.ep, "dp": lay.dp, "tp": lay.tp,
            "batch_per_device": lay.batch, "context": lay.context,
            "tokens_per_s_per_device": self.tokens_per_s_per_device,
            "tokens_per_s_per_node": self.tokens_per_s_per_node,
            "tokens_per_s_per_node_band": [lo, hi],
            "tokens_per_s_per_user": self.tokens_per_s_per_user,
            "computed_tokens_per_s_per_device": self.computed_tokens_per_step / self.step_s,
            "bottleneck": self.bottleneck,
            "feasible": self.feasible,
            "step_s": self.step_s,
            "ttft_s": self.ttft_s if lay.phase == "prefill" else None,
            "compute_s": self.compute_s, "memory_s": self.memory_s, "communication_s": self.comm_s,
            "latency_s": self.latency_s,
            "overlap_hidden_s": self.hidden_s,
            "micro_batches": self.micro_batches,
            "shares": self.shares,
            "imbalance": self.imbalance,
            "weight_bytes_per_device": self.weight_bytes,
            "kv_bytes_per_device": self.kv_bytes,
            "capacity_bytes_per_device": self.capacity_bytes,
            "devices_per_node": self.devices_per_node,
            "calibration": asdict(self.calibration),
            "chip_efficiency": None if self.chip is None else asdict(self.chip),
            "fabrics": None if self.fabrics is None else asdict(self.fabrics),
            "layout": asdict(lay),
            "ops": [{"name": o.name, "flops": o.flops, "bytes": o.bytes, "time_s": o.time_s, "bound": o.bound,
                     "precision": o.precision} for o in self.ops],
            "all_to_all": None if self.comm is None else {
                **asdict(self.comm), "time_s": self.comm.time_s, "link": self.comm.link},
            "notes": self.notes,
        }
        return out


def routing_imbalance(spec: ModelSpec, lay: Layout, tokens_per_device: float, residual: float = 1.0) -> float:
    """max/mean device load: EPLB placement x finite-batch sampling noise.

    The placement part comes from a routing profile, a Zipf skew, or else ``residual`` (what EPLB
    leaves on real traffic, a fitted factor of the calibration).
    """
    if not spec.is_moe or lay.ep <= 1:
        return 1.0
    if lay.imbalance is not None:
        return lay.imbalance
    base = residual
    if lay.placement_imbalance is not None:
        base = lay.placement_imbalance
    elif lay.routing_zipf > 0:
        loads = eplb.zipf_loads(spec.num_experts, lay.routing_zipf)
        base = _placement_imbalance(tuple(loads), lay.ep, lay.redundant_experts)
    pairs = tokens_per_device * spec.top_k
    return base * eplb.noise_factor(pairs, lay.ep)


@lru_cache(maxsize=256)
def _placement_imbalance(loads: tuple[float, ...], ep: int, redundant: int) -> float:
    return eplb.mean_imbalance(loads, ep, redundant)


# kernels per layer and micro-batch of each operation (the TRT-LLM DeepSeek-R1 decode layer:
# fused q/kv down-projection, 2 RMSNorms, q up-projection, absorbed k / v batched GEMMs,
# o-projection, residual add+norm; RoPE + cache write and the attention kernel; quantise,
# gate-up GEMM, activation+quantise, down GEMM; router GEMM + top-k)
KERNELS = {"attention projections": 8, "attention core": 2, "routed experts": 4, "shared experts": 3,
           "routers": 2, "dense FFN": 3, "LM head": 2}


def plan_cluster(spec: ModelSpec, machine: Machine, layout: Layout, *, precision: str = "fp8",
                 calibration: Calibration | None = None) -> ClusterResult:
    """Predict one device's step time, throughput and binding resource for ``layout``."""
    lay = validate(layout, spec, machine)
    cal = calibration or calibration_for(machine)
    chip = chip_eff(machine)
    fab = fabrics(machine)
    sh = model_shape(spec, precision)
    tier = machine.tier(machine.compute_tier_name)
    mem_rate = tier.read_bw * chip.memory
    kv_rate = tier.read_bw * chip.attn_memory
    decode = lay.phase == "decode"
    tp = lay.tp
    # two-batch overlap splits the requests of a step into two micro-batches: a decode step needs
    # at least one request per micro-batch (a TP group shares its requests), else it runs as one
    overlap_on = lay.two_batch_overlap and (not decode or lay.batch * tp >= 2.0)
    n_mb = 2 if overlap_on else 1
    mode = lay.a2a if lay.a2a != "auto" else ("direct" if decode else "dedup")
    # prefill's normal-mode all-to-all kernels occupy part of the compute units while overlapped
    sm_left = 1.0 - (chip.comm_sm_share if (spec.is_moe and lay.ep > 1 and mode == "dedup"
                                             and overlap_on) else 0.0)

    keys: dict[str, str] = {}

    def key(fmt: str) -> str:
        if fmt not in keys:
            try:
                keys[fmt] = compute_key(machine, fmt)
            except KeyError:
                raise ClusterError(f"machine {machine.name!r} has no FLOP/s figure for {fmt!r}") from None
        return keys[fmt]

    def peak(fmt: str) -> float:
        return float(machine.flops[key(fmt)])

    def gemm_rate(fmt: str) -> float:
        return peak(fmt) * chip.gemm_eff(key(fmt)) * sm_left / cal.overhead

    def floor(op: str, layers: int) -> float:
        return KERNELS[op] * layers * n_mb * chip.kernel_floor_s * cal.floor_scale

    def rows(m_total: float) -> float:  # token rows per micro-batch, padded to the tensor-core tile
        return n_mb * padded_rows(m_total / n_mb, chip.mma_m)

    # tokens this device computes per step, and sequences it serves
    if decode:
        T = lay.batch * (1 + lay.mtp_tokens)
        n_seq = lay.batch
        ctx_attn = lay.context
        out_tokens = lay.batch * (1 + lay.mtp_tokens * lay.mtp_acceptance)
    else:
        T = lay.batch
        new_per_seq = lay.context * (1.0 - lay.cached_fraction)
        n_seq = T / new_per_seq
        cached = lay.context * lay.cached_fraction
        ctx_attn = cached + new_per_seq / 2.0  # causal: a new token sees the prefix + half the new
        out_tokens = T / (1.0 - lay.cached_fraction)

    # an on-chip "sram" tier (what-if) holds the hottest weights: always-on first, then experts
    hot = next((t for t in machine.tiers if t.name == "sram" and t.name != tier.name), None)
    hot_rate = hot.read_bw * chip.memory if hot else 0.0
    hot_left = [hot.capacity_bytes if hot else 0.0]

    def hot_frac(stored: float) -> float:
        if not hot or stored <= 0:
            return 0.0
        f = min(1.0, hot_left[0] / stored)
        hot_left[0] -= f * stored
        return f

    kv_tok = kv_bytes_per_token(sh, lay.kv_dtype)
    # MLA's latent cache is shared by all heads: TP ranks each hold their group's full cache
    kv_repl = tp if sh.attention == "mla" else max(1, tp // max(sh.kv_heads, 1))
    ops: list[Op] = []
    attn_dtype = lay.attention_dtype
    # attention projections (all layers); TP splits weights and multiplies tokens: FLOPs unchanged
    w = sh.attn_bytes / tp * n_mb
    f = 2 * sh.attn_params * T
    ops.append(Op("attention projections", f, w, gemm_rate(sh.fmt_attn), mem_rate,
                  sh.num_layers, w, hot_frac(sh.attn_bytes / tp), hot_rate,
                  padded_flops=f * rows(T * tp) / max(T * tp, 1e-12), floor_s=floor("attention projections",
                                                                                    sh.num_layers),
                  precision=key(sh.fmt_attn)))
    shared_hot = hot_frac(sh.shared_bytes)
    dense_hot = hot_frac(sh.dense_bytes)
    head_hot = hot_frac(sh.head_bytes)
    core_flops = T * _core_flops_per_token(sh, ctx_attn, lay.phase)
    if not decode and sh.attention == "mla" and lay.cached_fraction:
        # expanded-head prefill must re-expand the cached prefix's latent through kv_b_proj
        cached_tokens = n_seq * lay.context * lay.cached_fraction
        core_flops += cached_tokens * 2 * sh.kv_lora * sh.heads * (sh.qk_nope + sh.v_head) * sh.num_layers
    if decode:
        kv_read = n_seq * kv_repl * sum(_attended(lay.context, win) for win in sh.windows) * kv_tok / sh.num_layers
    else:  # read the cached prefix once, write the new tokens' KV
        kv_read = (n_seq * kv_repl * lay.context * lay.cached_fraction + T) * kv_tok
    attn_rate = peak(attn_dtype) * chip.attn_compute * sm_left / cal.overhead
    ops.append(Op("attention core", core_flops, kv_read, attn_rate, kv_rate, sh.num_layers,
                  floor_s=floor("attention core", sh.num_layers), precision=key(attn_dtype)))
    imb = 1.0
    slots = 0
    if spec.is_moe:
        imb = routing_imbalance(spec, lay, T, cal.eplb_residual)
        slots = math.ceil((sh.num_experts + lay.redundant_experts) / lay.ep)
        recv_pairs = T * sh.top_k * imb  # token-expert pairs this (slowest) device computes
        per_expert_mb = recv_pairs / slots / n_mb
        active_frac = 1.0 - math.exp(-per_expert_mb)  # local experts that receive >= 1 token
        w = slots * sh.expert_bytes * sh.n_moe * n_mb * active_frac
        f = 2 * sh.expert_params * recv_pairs * sh.n_moe
        # each active expert's GEMM pads its rows to the tile: rows per active expert per micro-batch
        m_act = per_expert_mb / max(active_frac, 1e-12)
        pad = padded_rows(m_act, chip.mma_m) / m_act if m_act > 0 else 1.0
        ops.append(Op("routed experts", f, w, gemm_rate(sh.fmt_expert), mem_rate, sh.n_moe, w,
                      hot_frac(slots * sh.expert_bytes * sh.n_moe), hot_rate, padded_flops=f * pad,
                      floor_s=floor("routed experts", sh.n_moe), precision=key(sh.fmt_expert)))
        if sh.shared_params:
            w = sh.shared_bytes * n_mb
            f = 2 * sh.shared_params * T
            ops.append(Op("shared experts", f, w, gemm_rate(sh.fmt_shared), mem_rate, sh.n_moe, w, shared_hot,
                          hot_rate, padded_flops=f * rows(T) / max(T, 1e-12),
                          floor_s=floor("shared experts", sh.n_moe), precision=key(sh.fmt_shared)))
        ops.append(Op("routers", 2 * sh.router_params * T, 0.0, gemm_rate("bf16"), mem_rate, sh.n_moe,
                      floor_s=floor("routers", sh.n_moe), precision="bf16"))
    if sh.dense_params:
        w = sh.dense_bytes * n_mb
        f = 2 * sh.dense_params * T
        ops.append(Op("dense FFN", f, w, gemm_rate(sh.fmt_dense), mem_rate, sh.n_dense, w, dense_hot, hot_rate,
                      padded_flops=f * rows(T) / max(T, 1e-12), floor_s=floor("dense FFN", sh.n_dense),
                      precision=key(sh.fmt_dense)))
    head_tokens = T if decode else n_seq
    w = sh.head_bytes * n_mb
    ops.append(Op("LM head", 2 * sh.head_params * head_tokens, w, gemm_rate(sh.fmt_head), mem_rate, 1, w,
                  head_hot, hot_rate, floor_s=floor("LM head", 1), precision=key(sh.fmt_head)))

    # ---- communication
    comm = _all_to_all(sh, machine, fab, lay, T, imb, n_mb, mode) if spec.is_moe and lay.ep > 1 else None
    tp_comm_s = 0.0
    if tp > 1:
        if not machine.scale_up_bw:
            raise ClusterError(f"machine {machine.name!r} has no scale-up bandwidth for tp={tp}")
        # two all-reduces per layer over the TP group (attention output, FFN/MoE output), bf16,
        # each a one-shot collective: alpha + 2 (tp-1)/tp x bytes / bw
        per_ar = 2 * (tp - 1) / tp * (T * tp) * sh.hidden * 2.0 / n_mb
        tp_comm_s = collective_s(per_ar, machine.scale_up_bw, fab.scale_up) * 2 * sh.num_layers * n_mb

    # ---- combine: per MoE layer, local work and all-to-all overlap
    compute_s = sum(o.time_s for o in ops if o.bound == "compute")
    memory_s = sum(o.time_s for o in ops if o.bound == "memory")
    latency_s = sum(o.time_s for o in ops if o.bound == "latency")
    local_s = compute_s + memory_s + latency_s
    comm_s = (comm.time_s * sh.n_moe if comm else 0.0) + tp_comm_s
    hidden = 0.0
    if overlap_on and comm is not None and sh.n_moe:
        moe_names = ("attention projections", "attention core", "routed experts", "shared experts", "routers")
        local_moe = sum(o.time_s * (sh.n_moe / o.layers if o.name.startswith("attention") else 1.0)
                        for o in ops if o.name in moe_names) / sh.n_moe
        hidden = cal.overlap * min(local_moe, comm.time_s) * sh.n_moe
    step = local_s + comm_s - hidden

    # ---- memory capacity
    weights = (sh.always_on_bytes - sh.attn_bytes * (1 - 1 / tp) + slots * sh.expert_bytes * sh.n_moe
               + (sh.mtp_bytes if lay.mtp_tokens else 0.0))
    kv = n_seq * kv_repl * lay.context * kv_tok  # the KV cache of the sequences in flight
    cap = tier.capacity_bytes
    feasible = weights + kv <= cap * (1 - RESERVE_FRACTION)
    notes = [cal.describe()]
    if not feasible:
        notes.append(f"does not fit: weights {weights / 1e9:.1f} GB + KV {kv / 1e9:.1f} GB > "
                     f"{(1 - RESERVE_FRACTION):.0%} of {cap / 1e9:.0f} GB {tier.name}")
    if lay.mtp_tokens:
        notes.append("MTP draft layer compute not counted (verification tokens are)")
    return ClusterResult(
        model=spec.name, machine=machine.name, layout=lay, calibration=cal,
        tokens_per_step=out_tokens, computed_tokens_per_step=T,
        step_s=step, compute_s=compute_s, memory_s=memory_s, comm_s=comm_s, hidden_s=hidden,
        imbalance=imb, ops=ops, comm=comm, tp_comm_s=tp_comm_s, weight_bytes=weights, kv_bytes=kv,
        capacity_bytes=cap, feasible=feasible, devices_per_node=max(1, machine.devices_per_node),
        notes=notes, latency_s=latency_s, chip=chip, fabrics=fab, micro_batches=n_mb,
    )


# per hidden value (+ scales); fp32 is what the CPU expert-parallel runtime moves in float32
_PAIR_BYTES = {"fp8": 1.0 + 4.0 / 128, "bf16": 2.0, "fp4": 0.5 + 1.0 / 16, "fp32": 4.0}


def pair_bytes(hidden: int, dtype: str) -> float:
    """Bytes one token-expert pair moves in one direction of the all-to-all (dispatch or
    combine): ``hidden`` values in ``dtype`` plus its scales. Shared with the expert-parallel
    runtime (``moetier.distributed``), whose measured bytes must equal this count."""
    return hidden * _PAIR_BYTES[dtype]


def direct_remote_pairs(top_k: int, ep: int, domain: int = 1) -> tuple[float, float]:
    """Expected remote token-expert pairs per token in ``direct`` mode (each pair sent to the
    device owning its expert, experts spread evenly over ``ep`` devices): (crossing scale-out,
    inside the scale-up domain of ``domain`` devices)."""
    return top_k * (ep - domain) / ep, top_k * (domain - 1) / ep


EP_EXCHANGES = ("replicated", "direct")  # the CPU expert-parallel runtime's patterns (docs/expert-parallel.md)


def ep_step_rows(exchange: str, world: int, rank: int, local_pairs: int, remote_pairs: int) -> dict[str, int]:
    """Hidden rows one rank of the expert-parallel runtime (``moetier.distributed``) moves, given
    the token-expert pairs it computed (``local_pairs``) and those computed on other ranks
    (``remote_pairs``: counted by rank 0 in ``direct``; by every rank in ``replicated``). Times
    :func:`pair_bytes` this is the runtime's measured byte count, exactly (asserted by tests):

    * ``direct`` (rank 0 alone runs attention and routers; this module's ``direct`` mode): rank 0
      dispatches each remote pair's row to the expert's rank and gets one row back; a follower
      receives and returns one row per pair it computes;
    * ``replicated`` (every rank runs attention and routers): no dispatch; every rank sends each
      of its pairs' outputs to every other rank (``world - 1`` rows per local pair) and receives
      one row per pair computed elsewhere.
    """
    if exchange == "direct":
        if rank == 0:
            return {"dispatch_sent": remote_pairs, "dispatch_recv": 0, "combine_sent": 0, "combine_recv": remote_pairs}
        return {"dispatch_sent": 0, "dispatch_recv": local_pairs, "combine_sent": local_pairs, "combine_recv": 0}
    if exchange == "replicated":
        return {"dispatch_sent": 0, "dispatch_recv": 0, "combine_sent": local_pairs * (world - 1),
                "combine_recv": remote_pairs}
    raise ValueError(f"exchange {exchange!r}: expected one of {EP_EXCHANGES}")


def ep_rows_per_token(exchange: str, top_k: int, world: int) -> dict[str, float]:
    """Expected rows per token of the same patterns with experts spread evenly (uniform routing):
    rank 0's rows sent and received, and the rows every link of the job carries in total.
    ``direct``: rank 0 sends and receives ``k (P-1)/P`` (:func:`direct_remote_pairs`), ``2 k (P-1)/P``
    in all; ``replicated``: every rank sends and receives ``k (P-1)/P``, ``k (P-1)`` in all (equal
    for P = 2, more for P > 2: the price of no dispatch)."""
    remote = direct_remote_pairs(top_k, world)[0]
    total = {"direct": 2 * remote, "replicated": world * remote}[exchange]
    return {"rank0_sent": remote, "rank0_recv": remote, "total": total}


def _all_to_all(sh: Shape, machine: Machine, fab: Fabrics, lay: Layout, T: float, imb: float,
                n_mb: int, mode: str) -> CommTerm:
    H = sh.hidden
    disp = pair_bytes(H, lay.dispatch_dtype)
    comb = pair_bytes(H, lay.combine_dtype)
    pair = disp + comb
    e = lay.ep
    S = min(_domain(machine), e)
    k = sh.top_k
    if mode == "direct" or S <= 1:
        out_pairs, up_pairs = direct_remote_pairs(k, e, S)
    else:
        n_dom = math.ceil(e / S)
        p_hit = _p_domain_hit(n_dom, sh)
        out_pairs = (n_dom - 1) * p_hit  # one copy per distinct remote domain
        up_pairs = _distinct(e, k) * (S - 1) / S  # forwarded inside each domain
    out_b = T * out_pairs * pair * imb
    up_b = T * up_pairs * pair * imb
    out_bw = (machine.scale_out_bw or 0.0) * fab.scale_out.link_eff
    up_bw = (machine.scale_up_bw or machine.scale_out_bw or 0.0) * fab.scale_up.link_eff
    out_s = out_b / out_bw if out_b else 0.0
    up_s = up_b / up_bw if up_b else 0.0
    remote = out_pairs + up_pairs
    slow = fab.scale_out if out_b else fab.scale_up
    return CommTerm(
        pairs_per_token=k, dispatch_bytes_per_pair=disp, combine_bytes_per_pair=comb,
        scale_out_bytes=out_b, scale_up_bytes=up_b, scale_out_s=out_s, scale_up_s=up_s,
        latency_s=2 * n_mb * slow.alpha_s, mode=mode,
        frac_inside=(up_pairs / remote) if remote else 1.0, fabric=slow.name,
    )


def batch_for_user_speed(spec: ModelSpec, machine: Machine, layout: Layout, target_tps_per_user: float,
                         *, precision: str = "fp8", calibration: Calibration | None = None,
                         max_batch: float = 4096.0, tol: float = 0.25, rel_tol: float = 1e-3) -> ClusterResult | None:
    """Largest decode batch per device whose per-user speed still meets the target.

    Returns None when even one request per device is slower than the target. The per-user speed
    falls monotonically with the batch and its inverse (the step time) is close to linear in it,
    so a bracketed false-position search on ``1/target - 1/speed`` (Illinois variant) finds the
    crossing in a few plans; every step keeps the bracket ``[a meets, b misses]`` and the answer
    is ``a`` once ``b - a`` is below ``tol`` requests or ``rel_tol`` of ``a``.
    """
    _positive("target-tps-per-user", target_tps_per_user)

    def run(b: float) -> ClusterResult:
        return plan_cluster(spec, machine, replace(layout, batch=b), precision=precision,
                            calibration=calibration)

    lo = run(1.0)
    if lo.tokens_per_s_per_user < target_tps_per_user:
        return None
    hi = run(max_batch)
    if hi.tokens_per_s_per_user >= target_tps_per_user:
        return hi

    def slack(r: ClusterResult) -> float:  # >= 0 when the target is met; ~linear in the batch
        return 1.0 / target_tps_per_user - 1.0 / r.tokens_per_s_per_user

    a, fa, best = 1.0, slack(lo), lo  # fa >= 0
    b, fb = max_batch, slack(hi)  # fb < 0
    side = 0
    for _ in range(60):
        if b - a < max(tol, rel_tol * a):
            break
        x = b - fb * (b - a) / (fb - fa) if fa != fb else 0.5 * (a + b)
        # stay strictly inside the bracket (the Illinois halving below keeps both ends moving)
        x = min(max(x, a + 0.25 * tol), b - 0.25 * tol)
        r = run(x)
        fx = slack(r)
        if r.tokens_per_s_per_user >= target_tps_per_user:
            a, fa, best = x, fx, r
            if side == +1:
                fb *= 0.5  # Illinois: halve the retained end's value after two moves on one side
            side = +1
        else:
            b, fb = x, fx
            if side == -1:
                fa *= 0.5
            side = -1
    return best


# ---------------------------------------------------------------------------------------
# layout search


SEARCHABLE = ("tp", "ep", "redundant_experts", "two_batch_overlap", "batch")


@dataclass(frozen=True)
class SearchResult:
    best: ClusterResult | None
    considered: int
    feasible: int
    top: tuple[ClusterResult, ...]
    space: dict[str, Any] = field(default_factory=dict)  # parameter -> values tried (or the fixed value)
    fixed: frozenset[str] = frozenset()


def search_space(spec: ModelSpec, machine: Machine, base: Layout,
                 fixed: frozenset[str] | set[str] = frozenset()) -> dict[str, list[Any]]:
    """The values each layout parameter takes in :func:`search`; a parameter in ``fixed`` keeps ``base``'s."""
    n = base.devices
    dom = _domain(machine)
    if "tp" in fixed:
        tps = [base.tp]
    elif "dp" in fixed and base.dp:
        tps = [n // base.dp]
    else:
        tps = [t for t in (1, 2, 4, 8) if n % t == 0 and t <= dom]
    if not spec.is_moe:
        eps = [1]
    elif "ep" in fixed:
        eps = [base.ep]
    else:
        eps = [e for e in range(1, n + 1) if n % e == 0 and e <= spec.num_experts + 64
               and (e <= dom or machine.scale_out_bw)]
    if "redundant_experts" in fixed or not spec.is_moe:
        reds: list[Any] = [base.redundant_experts]
    else:
        reds = ["0 or fill the last slot"]
    tbos = [base.two_batch_overlap] if "two_batch_overlap" in fixed else [True, False]
    if "batch" in fixed:
        batches: list[Any] = [base.batch]
    elif base.phase == "decode":
        batches = ["largest meeting the per-user target (bracketed search), shrunk until it fits"]
    else:
        batches = list(PREFILL_BATCHES)
    return {"tp": tps, "ep": eps, "redundant_experts": reds, "two_batch_overlap": tbos, "batch": batches}


def candidate_layouts(spec: ModelSpec, machine: Machine, base: Layout,
                      fixed: frozenset[str] | set[str] = frozenset()) -> list[Layout]:
    """tp x ep x redundant x two-batch-overlap candidates; parameters in ``fixed`` are not varied."""
    n = base.devices
    sp = search_space(spec, machine, base, fixed)
    out = []
    for tp in sp["tp"]:
        for ep in sp["ep"]:
            if "redundant_experts" in fixed or not spec.is_moe:
                reds = {base.redundant_experts}
            else:
                reds = {0}
                if ep > 1:
                    slots = math.ceil(spec.num_experts / ep)
                    reds.add(ep * slots - spec.num_experts if ep * slots > spec.num_experts else ep)
            for red in sorted(reds):
                for tbo in sp["two_batch_overlap"]:
                    out.append(replace(base, tp=tp, dp=n // tp, ep=ep, redundant_experts=red,
                                       two_batch_overlap=tbo))
    return out


PREFILL_BATCHES = (1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0)


def search(spec: ModelSpec, machine: Machine, base: Layout, target_tps_per_user: float, *,
           precision: str = "fp8", calibration: Calibration | None = None, keep: int = 5,
           fixed: frozenset[str] | set[str] = frozenset()) -> SearchResult:
    """Best layout (max tokens/s per node) whose per-user speed meets the target and that fits.

    Parameters named in ``fixed`` (``tp``, ``dp``, ``ep``, ``redundant_experts``,
    ``two_batch_overlap``, ``batch``) keep ``base``'s value: the search varies only the rest.
    """
    _positive("target-tps-per-user", target_tps_per_user)
    fixed = frozenset(fixed)
    found: list[ClusterResult] = []
    considered = 0
    for lay in candidate_layouts(spec, machine, base, fixed):
        considered += 1
        try:
            if "batch" in fixed:
                cands = [plan_cluster(spec, machine, lay, precision=precision, calibration=calibration)]
            elif lay.phase == "decode":
                r = batch_for_user_speed(spec, machine, lay, target_tps_per_user, precision=precision,
                                         calibration=calibration, max_batch=1024.0)
                # shrink until it fits in memory
                while r is not None and not r.feasible and r.layout.batch > 1:
                    r = plan_cluster(spec, machine, replace(r.layout, batch=max(1.0, math.floor(r.layout.batch * 0.8))),
                                     precision=precision, calibration=calibration)
                cands = [r] if r is not None else []
            else:
                cands = [plan_cluster(spec, machine, replace(lay, batch=b), precision=precision,
                                      calibration=calibration) for b in PREFILL_BATCHES]
        except ClusterError:
            continue
        for r in cands:
            if r.feasible and r.tokens_per_s_per_user >= target_tps_per_user * (1 - 1e-9):
                found.append(r)
    found.sort(key=lambda r: -r.tokens_per_s_per_node)
    return SearchResult(best=found[0] if found else None, considered=considered, feasible=len(found),
                        top=tuple(found[:keep]), space=search_space(spec, machine, base, fixed), fixed=fixed)
