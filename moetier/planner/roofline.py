"""Single-machine planner: placement over a weight hierarchy and a compute / memory /
communication roofline (``moetier plan MODEL --machine M``).

Public API (stable names; others call these):

``plan(spec, machine, *, batch=1, context=DEFAULT_CONTEXT, precision="bf16", fast_mem=None,
profile=None, cache_bytes=None, overlap=True, hit_rate=None) -> PlanResult``
    Place the model on ``machine`` and predict decode / prefill tokens/s.
``predict_decode_tokens_per_s(spec, machine, *, hit_rate, cache_bytes, precision, batch=1,
context=DEFAULT_CONTEXT) -> float``
    Turn a *measured* expert-cache hit rate into decode tokens/s (``moetier run --json``, the
    trace simulator). On the ``cpu`` machine the tiers are dram (cache) -> ssd (store).
``what_if(spec, machine, changes, **plan_kw) -> list[WhatIfResult]``
    Change one resource (``hbm_bw=2x``, ``sram=230MB``, ``flops=2x``, ``link_bw=100GB/s``,
    ``cache=10GB``, ...) and re-plan; each result has ``before``, ``after`` and the new binding
    resource. :data:`WHAT_IF_KEYS` lists the keys.
``load_profile(path, spec)`` / ``normalize_profile(array, spec)``
    Per-layer expert-selection probabilities ``[num_moe_layers, num_experts]``.

Model (all SI units; every assumption is listed in ``PlanResult.assumptions``):

* Placement. The KV cache (batch x context) goes in the compute tier. The always-on set
  (census groups embedding, lm_head, attention, norms, router, dense_ffn, shared_experts) goes
  whole into the nearest tier that holds it; a nearer tier too small for the whole set still
  takes whole groups that fit, largest first (not the embedding, of which only the looked-up
  rows are read); the set is split group by group only if no tier holds it. Routed
  experts are ranked by expected hotness (uniform ``top_k / E`` unless a ``profile`` is given)
  and fill the remaining capacity nearest tier first. "Fast" tiers are the compute tier and any
  nearer one; ``fast_mem`` caps their total capacity, ``cache_bytes`` caps the expert bytes they
  hold (the expert cache). MTP weights (speculative decoding only) are placed last and never read.
* Compute time = FLOPs / (peak x efficiency.compute). FLOPs per token = 2 x active params
  (embedding lookup excluded) + attention over the context (GQA: 4 x heads x head_dim x C;
  MLA decode with absorbed projections: 2 x heads x (2 kv_lora_rank + qk_rope_head_dim) x C,
  MLA prefill with decompressed K/V: 2 x heads x (qk_nope + qk_rope + v_head_dim) per key;
  sliding-window layers use min(C, window)). Integer weight formats are taken to compute at
  bf16 (weight-only quantization); fp8 / fp4 at their own rate when the machine has one.
  A single-token decode step also runs its GEMVs at the machine's measured per-format kernel
  rates (``Machine.kernel_rates``, weights/s of a cache-resident weight, from ``moetier probe``):
  kernel time = sum over the matrices multiplied of params / their stored format's rate. How it
  combines with memory time depends on who streams (``Machine.kernels_add_to_memory``):
  - a CPU (the probed ``cpu`` machine): the same cores stream the weights and dequantize /
    multiply them, and measured decode steps show the two *add*: per core, time per token =
    bytes / memory rate + weights / kernel compute rate. On the 2-core EPYC (Zen 4) dev machine,
    2.5 GB synthetic MoE, 1 thread, CPU ms per token predicted vs measured: bf16 16.5 / 16.9,
    int8 g128 13.2 / 11.9-13.6, fp8 14.9 / 12.9-13.6, int4 g32 10.0 / 9.5 (bench/README.md,
    2026-12-02), while max(memory, kernel) put the quantized formats at 35-60% of their bound.
    The step's "memory+compute" time is then memory time + kernel time (the binding resource
    named ``memory+compute``); FLOP-rate compute and communication still overlap with it.
  - otherwise (accelerators, whose load units keep streaming while the ALUs work): the kernel
    time is a floor on compute time and the step takes the max as below.
* Memory time = sum over the fast tiers of bytes read per step / (bandwidth x efficiency.memory).
  Per step: every always-on group once (embedding: only the looked-up rows), the expected number
  of unique experts touched by the step's tokens, ``sum_e 1 - (1 - p_le)^T`` per layer (tokens
  routed independently), and the KV cache at context C (2 bytes per element: GQA caches
  2 x kv_heads x head_dim per token per layer, MLA caches kv_lora_rank + qk_rope_head_dim).
* Communication time = for each farther tier, the bytes it must serve per step (missed experts,
  any always-on group placed there), *moved* to the compute tier over the narrowest link / tier
  bandwidth on the path (x efficiency). If a processor sits at that tier
  (``MemoryTier.compute_flops``: Fiddler's CPU-computes-the-expert idea: read locally, compute,
  move only activations) the missed experts are split between the two paths, which run
  concurrently, so that both finish together: with ``t_move`` and ``t_in`` the times to do all of
  them one way, the share moved is ``t_in / (t_move + t_in)`` and the time
  ``t_move t_in / (t_move + t_in)``, below either alone (the faster path gets most experts).
  Moved bytes are also read again from the compute tier (counted in memory time).
* Step time = max(compute, memory, communication) (and memory+compute, above) with
  ``overlap=True`` (the resources work concurrently, the slowest binds); ``overlap=False`` adds
  compute, memory and communication. Decode tokens/s =
  batch / step time; prefill tokens/s = batch x context / time of one prefill forward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moetier.errors import MoetierError
from moetier.planner.census import ALWAYS_ON_GROUPS, Census, Precision, census, parse_precision
from moetier.planner.hardware import Link, Machine, MemoryTier
from moetier.planner.machines import fmt_bytes, fmt_seconds, fmt_si, fmt_tokens_per_s, parse_quantity, parse_size
from moetier.spec import ModelSpec

DEFAULT_CONTEXT = 4096
KV_BYTES_PER_ELEMENT = 2.0  # bf16 KV cache
DEFAULT_SRAM_BW = 80e12  # Groq LPU SRAM bandwidth (hardware.md, U): default for a what-if SRAM tier
RESOURCES = ("compute", "memory", "memory+compute", "communication")


class PlanError(MoetierError):
    """The model cannot be placed or planned on this machine with these parameters."""


# --------------------------------------------------------------------------------------
# model arithmetic (pure)


def _eff_context(spec: ModelSpec, layer: int, context: int) -> int:
    if spec.layer_types and spec.layer_types[layer] == "sliding_attention" and spec.sliding_window:
        return min(context, spec.sliding_window)
    return context


def kv_bytes_per_token_layer(spec: ModelSpec) -> float:
    """KV-cache bytes per token per layer (MLA-aware)."""
    if spec.attention == "mla":
        return (spec.kv_lora_rank + spec.qk_rope_head_dim) * KV_BYTES_PER_ELEMENT
    return 2 * spec.num_kv_heads * spec.head_dim * KV_BYTES_PER_ELEMENT


def kv_cache_bytes(spec: ModelSpec, context: int) -> float:
    """KV-cache bytes of ONE sequence holding ``context`` tokens (all layers)."""
    per = kv_bytes_per_token_layer(spec)
    return float(sum(_eff_context(spec, i, context) for i in range(spec.num_layers)) * per)


def _attn_coeff(spec: ModelSpec, prefill: bool = False) -> float:
    """Attention FLOPs per (query token, key position) in one layer."""
    if spec.attention == "mla":
        if prefill:  # prefill decompresses K/V: per-head q.k over nope+rope dims, p.v over v dims
            return 2.0 * spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim)
        # absorbed MLA decode: scores over kv_lora_rank + rope dims, values over kv_lora_rank
        return 2.0 * spec.num_heads * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)
    return 4.0 * spec.num_heads * spec.head_dim


def attention_flops_decode(spec: ModelSpec, context: int) -> float:
    """Attention FLOPs for one new token attending to ``context`` positions (all layers)."""
    c = _attn_coeff(spec)
    return float(sum(c * _eff_context(spec, i, context) for i in range(spec.num_layers)))


def attention_flops_prefill(spec: ModelSpec, context: int) -> float:
    """Causal attention FLOPs of a ``context``-token prompt (one sequence, all layers)."""
    c = _attn_coeff(spec, prefill=True)
    total = 0.0
    for i in range(spec.num_layers):
        w = _eff_context(spec, i, context)
        if w >= context:
            total += c * context * (context + 1) / 2
        else:  # first w positions grow, the rest see w keys
            total += c * (w * (w + 1) / 2 + (context - w) * w)
    return total


def uniform_profile(spec: ModelSpec) -> np.ndarray:
    """Every expert selected with probability top_k / E per token."""
    return np.full((spec.num_moe_layers, spec.num_experts), spec.top_k / max(spec.num_experts, 1))


def normalize_profile(profile: Any, spec: ModelSpec, source: str = "profile") -> np.ndarray:
    """Check shape ``[num_moe_layers, num_experts]`` and scale rows to sum to ``top_k``.

    Accepts selection probabilities (rows sum to top_k), frequencies (rows sum to 1) or raw
    counts; each row is rescaled to sum to top_k and clipped at 1.
    """
    try:
        arr = np.asarray(profile, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanError(f"{source}: expected a numeric array [moe_layers, experts]") from None
    want = (spec.num_moe_layers, spec.num_experts)
    if arr.shape != want:
        raise PlanError(f"{source}: shape {tuple(arr.shape)}, expected {want} (moe_layers, experts) "
                        f"for {spec.name}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise PlanError(f"{source}: entries must be finite and >= 0")
    sums = arr.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        bad = int(np.argmin(sums[:, 0]))
        raise PlanError(f"{source}: MoE layer row {bad} is all zeros")
    p = arr / sums * spec.top_k
    for _ in range(8):  # clip at 1 and hand the excess to the rest of the row
        over = p > 1
        if not over.any():
            break
        p = np.minimum(p, 1.0)
        deficit = spec.top_k - p.sum(axis=1, keepdims=True)
        free = np.where(p < 1, p, 0)
        fs = free.sum(axis=1, keepdims=True)
        p = p + np.where(fs > 0, free / np.where(fs > 0, fs, 1) * deficit, 0)
    return np.minimum(p, 1.0)


def profile_from_layer_counts(counts: Mapping[int, Any], spec: ModelSpec, source: str = "profile") -> np.ndarray:
    """``{decoder layer index: per-expert selection counts}`` (e.g. ``traces.simulate.layer_counts``)
    -> a normalized ``[num_moe_layers, num_experts]`` profile; MoE layers without counts get a
    uniform row."""
    ids = spec.moe_layer_ids
    keys = [int(k) for k in counts]
    if keys and not set(keys) <= set(ids):
        bad = sorted(set(keys) - set(ids))[0]
        raise PlanError(f"{source}: layer {bad} is not a MoE layer of {spec.name} (MoE layers: "
                        f"{ids[0]}..{ids[-1]})" if ids else f"{source}: {spec.name} has no MoE layers")
    arr = uniform_profile(spec).copy()
    for k, v in counts.items():
        row = np.asarray(v, dtype=np.float64)
        if row.shape != (spec.num_experts,):
            raise PlanError(f"{source}: layer {k} has {row.shape} counts, expected ({spec.num_experts},)")
        if row.sum() > 0:
            arr[ids.index(int(k))] = row
    return normalize_profile(arr, spec, source)


def load_profile(path: str | Path, spec: ModelSpec) -> np.ndarray:
    """Read a profile: ``.npy``, ``.csv`` (one row per MoE layer), ``.json`` (a list of rows, an
    object with one of the keys ``expert_probability``, ``probabilities``, ``profile``,
    ``counts``, or a ``moetier.routing_profile/1`` object with ``layers[i].counts``), or a
    routing trace (``.npz`` moetier trace or anything ``moetier.traces`` imports: per-expert
    selection counts per layer)."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{p}: no such profile file")
    if p.suffix in (".npz", ".jsonl"):
        from moetier.traces.importers import open_trace
        from moetier.traces.simulate import layer_counts

        trace = open_trace(p)
        if trace.num_experts != spec.num_experts:
            raise PlanError(f"{p}: trace has {trace.num_experts} experts per layer, {spec.name} has "
                            f"{spec.num_experts}")
        return profile_from_layer_counts(layer_counts(trace), spec, source=str(p))
    try:
        if p.suffix == ".npy":
            arr: Any = np.load(p, allow_pickle=False)
        elif p.suffix == ".csv":
            arr = np.loadtxt(p, delimiter=",", ndmin=2)
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("layers"), list):
                # moetier.routing_profile/1 (shipped beside the embedded model): per-layer counts
                by_layer = {int(r["layer"]): r.get("counts") or r.get("frequency")
                            for r in data["layers"] if isinstance(r, dict) and "layer" in r}
                missing = [i for i in spec.moe_layer_ids if by_layer.get(i) is None]
                if missing:
                    raise PlanError(f"{p}: no per-expert counts for MoE layer(s) {missing}")
                data = [by_layer[i] for i in spec.moe_layer_ids]
            elif isinstance(data, dict):
                for k in ("expert_probability", "probabilities", "profile", "counts"):
                    if k in data:
                        data = data[k]
                        break
                else:
                    raise PlanError(f"{p}: JSON object without one of the keys expert_probability, "
                                    "probabilities, profile, counts")
            arr = data
    except (OSError, ValueError) as e:
        raise PlanError(f"{p}: cannot read profile ({e})") from None
    return normalize_profile(arr, spec, source=str(p))


def expected_unique(p: np.ndarray, tokens: float) -> np.ndarray:
    """Probability each expert is touched at least once by ``tokens`` independent tokens."""
    return 1.0 - np.power(1.0 - np.clip(p, 0.0, 1.0), tokens)


def _compute_precision(prec: Precision, group: str) -> str:
    f = prec.compute_format(group)
    if f in ("fp8", "fp4", "nvfp4", "fp32", "fp16", "bf16"):
        return "fp4" if f == "nvfp4" else f
    return "bf16"  # int weights: weight-only quantization, bf16 math


# --------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class TierTraffic:
    """What one tier serves in one step of a phase."""

    name: str
    fast: bool  # compute tier or nearer: read directly by the compute units
    read_bytes: float  # fast tiers: bytes read by compute (incl. bytes moved up from far tiers)
    served_bytes: float  # far tiers: bytes this tier must serve (missed experts, groups)
    time_s: float  # fast: read time (memory); far: transfer or in-place time (communication)
    mode: str = ""  # far tiers: "move" | "split" (some moved, rest computed in place) | ""
    path_bw: float | None = None  # far tiers: effective bytes/s when moved
    moved_fraction: float = 0.0  # far tiers: share of the served bytes moved up (rest in place)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fast": self.fast, "read_bytes": self.read_bytes,
                "served_bytes": self.served_bytes, "time_s": self.time_s, "mode": self.mode,
                "path_bw": self.path_bw, "moved_fraction": self.moved_fraction}


@dataclass(frozen=True)
class PhaseResult:
    name: str  # "decode" | "prefill"
    tokens: float  # tokens processed by one step
    tokens_per_s: float
    step_time_s: float
    compute_s: float
    memory_s: float
    communication_s: float
    bottleneck: str
    flops: float  # FLOPs done by the compute tier in one step
    expected_unique_experts: float  # summed over MoE layers
    tiers: tuple[TierTraffic, ...]
    # single-token decode: the native GEMVs' time at the measured kernel rates, and how it meets
    # memory time: "add" (CPU: memory+compute = memory + kernel), "max" (a floor on compute), ""
    kernel_s: float = 0.0
    kernel_mode: str = ""

    @property
    def memory_compute_s(self) -> float:
        """Memory time + kernel time where they add (``kernel_mode == "add"``), else 0."""
        return self.memory_s + self.kernel_s if self.kernel_mode == "add" else 0.0

    def to_json(self) -> dict[str, Any]:
        times = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.communication_s}
        if self.kernel_mode:
            times["kernel"] = self.kernel_s
        if self.kernel_mode == "add":
            times["memory+compute"] = self.memory_compute_s
        return {"tokens_per_step": self.tokens, "tokens_per_s": self.tokens_per_s,
                "step_time_s": self.step_time_s, "kernel_mode": self.kernel_mode,
                "times_s": times,
                "bottleneck": self.bottleneck, "flops": self.flops,
                "expected_unique_experts": self.expected_unique_experts,
                "tiers": [t.to_json() for t in self.tiers]}


@dataclass(frozen=True)
class TierPlacement:
    name: str
    capacity_bytes: float  # after fast_mem cap
    used_bytes: float
    fast: bool
    groups: tuple[str, ...]
    kv_bytes: float
    experts: int
    experts_per_layer: tuple[int, ...]


@dataclass(frozen=True)
class PlanResult:
    model: str
    machine: str
    precision: str
    batch: int
    context: int
    overlap: bool
    decode: PhaseResult
    prefill: PhaseResult
    placement: tuple[TierPlacement, ...]
    efficiency: dict[str, float]
    expert_bytes: float
    always_on_bytes: float
    routed_bytes: float
    kv_bytes: float
    hit_rate: float  # expected fraction of decode expert reads served by fast tiers
    assumptions: tuple[str, ...]
    machine_confidence: str
    expert_tier: np.ndarray = field(repr=False, compare=False)  # [moe_layers, experts] tier index

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.tokens_per_s

    @property
    def bottleneck(self) -> str:
        return self.decode.bottleneck

    def to_json(self) -> dict[str, Any]:
        tiers = [t.name for t in self.placement]
        out: dict[str, Any] = {
            "model": self.model, "machine": self.machine, "machine_confidence": self.machine_confidence,
            "precision": self.precision, "batch": self.batch, "context": self.context,
            "overlap": self.overlap,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "bottleneck": self.bottleneck,
            "prefill_bottleneck": self.prefill.bottleneck,
            "decode": self.decode.to_json(),
            "prefill": self.prefill.to_json(),
            "hit_rate": self.hit_rate,
            "bytes": {"always_on": self.always_on_bytes, "routed": self.routed_bytes,
                      "expert": self.expert_bytes, "kv_cache": self.kv_bytes},
            "placement": {
                "tiers": [
                    {"name": t.name, "fast": t.fast, "capacity_bytes": t.capacity_bytes,
                     "used_bytes": t.used_bytes, "groups": list(t.groups), "kv_bytes": t.kv_bytes,
                     "experts": t.experts, "experts_per_layer": list(t.experts_per_layer)}
                    for t in self.placement
                ],
                "groups": {g: t.name for t in self.placement for g in t.groups},
            },
            "efficiency": self.efficiency,
            "assumptions": list(self.assumptions),
        }
        if self.expert_tier.size and self.expert_tier.size <= 4096:
            out["placement"]["expert_tier"] = [[tiers[i] for i in row] for row in self.expert_tier.tolist()]
        return out


# --------------------------------------------------------------------------------------
# planning


def _check_pos_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise PlanError(f"{what}: expected a positive integer, got {v!r}")
    return int(v)


def _check_opt_bytes(v: Any, what: str, allow_zero: bool, whole: float | None = None) -> float | None:
    """Bytes from a number (API callers) or, for text, by the one size rule
    (:func:`~moetier.planner.machines.parse_size`): a fraction or percentage is of ``whole``
    (the routed experts' bytes; refused where there is no whole)."""
    if v is None:
        return None
    if isinstance(v, str):
        size = parse_size(v, what, allow_zero=allow_zero)
        if size.fraction is None:
            return float(size.bytes or 0.0)
        if whole is None:
            raise PlanError(f"{what}: {v!r} is a fraction, but there is nothing to take it of; give a size like "
                            "'24GB'")
        return size.fraction * whole
    x = parse_quantity(v, what, "size")
    if x < 0 or (x == 0 and not allow_zero):
        raise PlanError(f"{what}: expected {'>= 0' if allow_zero else '> 0'} bytes, got {v!r}")
    return x


def _validate_machine(m: Machine) -> None:
    if not m.tiers:
        raise PlanError(f"machine {m.name!r}: no memory tiers")
    for t in m.tiers:
        if not (t.capacity_bytes > 0) or not (t.read_bw > 0):
            raise PlanError(f"machine {m.name!r}: tier {t.name!r} needs capacity > 0 and read_bw > 0, got "
                            f"capacity {t.capacity_bytes!r}, read_bw {t.read_bw!r}")
    names = [t.name for t in m.tiers]
    if m.compute_tier_name not in names:
        raise PlanError(f"machine {m.name!r}: compute_tier {m.compute_tier!r} is not one of {names}")
    e = m.efficiency
    for k in ("compute", "memory", "link"):
        v = getattr(e, k)
        if not 0 < v <= 1:
            raise PlanError(f"machine {m.name!r}: efficiency.{k} must be in (0, 1], got {v!r}")


def _path(m: Machine, j: int, c: int) -> tuple[float, float, str]:
    """(effective bytes/s, latency s, description) moving from tier j up to compute tier c."""
    eff = m.efficiency
    src = m.tiers[j]
    bw = src.read_bw * eff.memory
    lat = src.latency_s
    desc = [f"{src.name} read"]
    for k in range(j, c, -1):
        lk: Link | None = m.link(m.tiers[k].name, m.tiers[k - 1].name)
        if lk is not None:
            if lk.bw * eff.link < bw:
                desc.append(lk.name)
            bw = min(bw, lk.bw * eff.link)
            lat += lk.latency_s
    return bw, lat, " / ".join(desc)


@dataclass
class _Ctx:
    spec: ModelSpec
    machine: Machine
    cen: Census
    prec: Precision
    c: int  # compute tier index
    group_tier: dict[str, int]
    expert_tier: np.ndarray
    p: np.ndarray
    assumptions: list[str]


def _place(spec: ModelSpec, m: Machine, cen: Census, p: np.ndarray, kv_total: float,
           fast_mem: float | None, cache_bytes: float | None, notes: list[str]):
    tiers = list(m.tiers)
    c = [t.name for t in tiers].index(m.compute_tier_name)
    caps = [t.capacity_bytes for t in tiers]
    if fast_mem is not None:
        budget = fast_mem
        for i in range(c + 1):
            caps[i] = min(caps[i], budget)
            budget -= caps[i]
        notes.append(f"fast_mem caps the fast tiers ({', '.join(t.name for t in tiers[:c + 1])}) at "
                     f"{fmt_bytes(fast_mem)} in total")
    free = list(caps)
    # KV cache: compute tier
    if kv_total > free[c]:
        raise PlanError(f"KV cache for batch x context needs {fmt_bytes(kv_total)} but compute tier "
                        f"{tiers[c].name!r} holds {fmt_bytes(free[c])}; lower --batch or --context")
    free[c] -= kv_total
    kv = [0.0] * len(tiers)
    kv[c] = kv_total

    # always-on set: whole into the nearest tier that holds it, else group by group
    group_tier: dict[str, int] = {}
    ao = [g for g in ALWAYS_ON_GROUPS if cen.groups[g].bytes > 0]
    ao_bytes = sum(cen.groups[g].bytes for g in ao)
    whole = next((i for i in range(len(tiers)) if free[i] >= ao_bytes), None)
    if whole is not None:
        for g in ao:
            group_tier[g] = whole
        free[whole] -= ao_bytes
    else:
        notes.append("no single tier holds the always-on set: split group by group, nearest first")
        for g in sorted(ao, key=lambda g: -cen.groups[g].bytes):
            b = cen.groups[g].bytes
            i = next((i for i in range(len(tiers)) if free[i] >= b), None)
            if i is None:
                raise PlanError(_no_fit(spec, m, cen, kv_total, caps, f"always-on group {g!r}"))
            group_tier[g] = i
            free[i] -= b
    if whole is not None and whole > c:
        notes.append(f"always-on set does not fit the fast tiers: placed in {tiers[whole].name} and "
                     "streamed every step")
    if whole is not None and whole > 0:
        # a nearer tier too small for the whole set still takes whole groups that fit (largest
        # first): every always-on byte is read each step, more often than any routed expert's.
        # The embedding stays: only its looked-up rows are read.
        moved = []
        for i in range(whole):
            for g in sorted(ao, key=lambda g: -cen.groups[g].bytes):
                b = cen.groups[g].bytes
                if g != "embedding" and group_tier[g] == whole and b <= free[i]:
                    group_tier[g] = i
                    free[i] -= b
                    free[whole] += b
                    moved.append(f"{g}->{tiers[i].name}")
        if moved:
            notes.append("always-on groups moved to a nearer tier too small for the whole set: "
                         + ", ".join(moved))

    # routed experts by hotness, nearest first; the fast tiers take at most cache_bytes of experts
    L, E = p.shape
    expert_tier = np.full((L, E), -1, dtype=np.int64)
    eb = cen.expert_bytes
    if L and E:
        order = np.argsort(-p.ravel(), kind="stable")
        pos = 0
        fast_budget = math.inf if cache_bytes is None else cache_bytes
        for i in range(len(tiers)):
            room = free[i]
            if i <= c:
                room = min(room, fast_budget)
            n = int(min(len(order) - pos, max(0.0, room) // eb)) if eb > 0 else len(order) - pos
            if n <= 0:
                continue
            idx = order[pos:pos + n]
            expert_tier.ravel()[idx] = i
            pos += n
            free[i] -= n * eb
            if i <= c:
                fast_budget -= n * eb
            if pos >= len(order):
                break
        if pos < len(order):
            raise PlanError(_no_fit(spec, m, cen, kv_total, caps, f"{len(order) - pos} routed experts"))
    # MTP: cold, placed in the farthest tier with room (never read while decoding)
    mtp = cen.groups.get("mtp")
    if mtp is not None and mtp.bytes > 0:
        i = next((i for i in range(len(tiers) - 1, -1, -1) if free[i] >= mtp.bytes), None)
        if i is None:
            notes.append("mtp weights not placed (no room; only used for speculative decoding)")
        else:
            group_tier["mtp"] = i
            free[i] -= mtp.bytes
            notes.append("mtp weights placed in the farthest tier with room and not read (no speculative "
                         "decoding modelled)")
    placement = []
    for i, t in enumerate(tiers):
        mask = expert_tier == i
        placement.append(TierPlacement(
            name=t.name, capacity_bytes=caps[i], used_bytes=caps[i] - free[i], fast=i <= c,
            groups=tuple(g for g, ti in group_tier.items() if ti == i), kv_bytes=kv[i],
            experts=int(mask.sum()), experts_per_layer=tuple(int(x) for x in mask.sum(axis=1)),
        ))
    return c, group_tier, expert_tier, tuple(placement)


def _no_fit(spec: ModelSpec, m: Machine, cen: Census, kv: float, caps: list[float], what: str) -> str:
    need = cen.always_on_bytes + cen.routed_bytes + kv
    have = ", ".join(f"{t.name} {fmt_bytes(cap)}" for t, cap in zip(m.tiers, caps))
    return (f"{spec.name} at {cen.precision.name} does not fit on {m.name}: {what} left over; needs "
            f"{fmt_bytes(need)} (always-on {fmt_bytes(cen.always_on_bytes)} + experts "
            f"{fmt_bytes(cen.routed_bytes)} + KV {fmt_bytes(kv)}), tiers hold {have}. Try a smaller "
            "--precision, --machine FILE with a farther tier (e.g. ssd), or --devices N")


def _phase(ctx: _Ctx, name: str, tokens: float, kv_read: float, kv_write: float, attn_flops: float,
           overlap: bool, hit_rate: float | None) -> PhaseResult:
    spec, m, cen, prec, c = ctx.spec, ctx.machine, ctx.cen, ctx.prec, ctx.c
    eff = m.efficiency
    n = len(m.tiers)
    served = [0.0] * n  # bytes each tier supplies this step
    transfers = [0.0] * n  # number of separate transfers (for latency)
    routed_tokens = [0.0] * n  # token-expert pairs computed on each tier's experts
    # always-on groups
    for g, ti in ctx.group_tier.items():
        if g == "mtp":
            continue
        b = cen.groups[g].bytes
        if g == "embedding" and not cen.head_is_embedding:
            b = min(b, tokens * spec.hidden_size * prec.bytes_per_param("embedding"))
        served[ti] += b
        transfers[ti] += 1
    # routed experts
    unique_total = 0.0
    if ctx.p.size:
        u = expected_unique(ctx.p, tokens)
        unique_total = float(u.sum())
        per_tier_u = np.array([float(u[ctx.expert_tier == i].sum()) for i in range(n)])
        per_tier_tok = np.array([float(ctx.p[ctx.expert_tier == i].sum()) * tokens for i in range(n)])
        if hit_rate is not None:
            fast_u, far_u = per_tier_u[: c + 1].sum(), per_tier_u[c + 1:].sum()
            fast_t, far_t = per_tier_tok[: c + 1].sum(), per_tier_tok[c + 1:].sum()
            new_u, new_t = np.zeros(n), np.zeros(n)
            for lo, hi, tot_u, frac in ((0, c + 1, fast_u, hit_rate),
                                        (c + 1, n, far_u, 1.0 - hit_rate)):
                if frac <= 0:
                    continue
                if hi <= lo:
                    raise PlanError(f"hit_rate {hit_rate:g} < 1 needs a tier beyond the compute tier; "
                                    f"machine {m.name!r} has none")
                w = per_tier_u[lo:hi] / tot_u if tot_u > 0 else np.eye(hi - lo)[0]
                new_u[lo:hi] = w * frac * unique_total
                new_t[lo:hi] = w * frac * (fast_t + far_t)
            per_tier_u, per_tier_tok = new_u, new_t
        for i in range(n):
            served[i] += per_tier_u[i] * cen.expert_bytes
            transfers[i] += per_tier_u[i]
            routed_tokens[i] += per_tier_tok[i]
    served[c] += kv_read + kv_write

    # compute FLOPs on the device, per group at its compute precision
    def rate(group: str) -> float:
        cp = _compute_precision(prec, group)
        try:
            return m.flops_for(cp) * eff.compute
        except KeyError:
            raise PlanError(f"machine {m.name!r} has no compute figure for {cp} (known: "
                            f"{', '.join(m.flops) or 'none'}); give one with --what-if flops=VALUE or "
                            "a --machine file") from None

    compute_s = 0.0
    flops_total = 0.0
    for g in ALWAYS_ON_GROUPS:
        if g == "embedding" and not cen.head_is_embedding:
            continue
        f = 2.0 * tokens * cen.groups[g].params
        if f:
            compute_s += f / rate(g)
            flops_total += f
    f_attn = attn_flops
    compute_s += f_attn / rate("attention")
    flops_total += f_attn
    f_per_routed = 2.0 * cen.expert_params
    dev_routed = sum(routed_tokens)

    # far tiers: move vs compute in place
    memory_bytes = list(served)
    traffic: list[TierTraffic] = []
    comm_s = 0.0
    far_modes: dict[int, tuple[str, float, float | None, float]] = {}
    for j in range(c + 1, n):
        if served[j] <= 0:
            far_modes[j] = ("", 0.0, None, 0.0)
            continue
        bw, lat, _ = _path(m, j, c)
        t_move = served[j] / bw + transfers[j] * lat
        t_in = math.inf
        t_tier = m.tiers[j]
        ao_far = any(ti == j and g != "mtp" for g, ti in ctx.group_tier.items())
        if t_tier.compute_flops and not ao_far:
            act = 2.0 * routed_tokens[j] * spec.hidden_size * KV_BYTES_PER_ELEMENT
            t_in = max(served[j] / (t_tier.read_bw * eff.memory),
                       f_per_routed * routed_tokens[j] / (t_tier.compute_flops * eff.compute)) + act / bw
        if math.isfinite(t_in):
            # both paths run at once: move a fraction f of the missed experts over the link while
            # the tier's own processor computes the rest; both costs are linear in the share, so
            # the step is shortest when they finish together: f = t_in / (t_move + t_in).
            f = t_in / (t_move + t_in)
            far_modes[j] = ("split" if 0.0 < f < 1.0 else ("move" if f >= 1.0 else "compute-in-place"),
                            t_move * f, bw, f)
            dev_routed -= routed_tokens[j] * (1.0 - f)
        else:
            f = 1.0
            far_modes[j] = ("move", t_move, bw, 1.0)
        memory_bytes[c] += served[j] * f  # moved bytes land in the compute tier and are read there
        comm_s += far_modes[j][1]
    f_routed = f_per_routed * dev_routed
    if f_routed:
        compute_s += f_routed / rate("routed_experts")
        flops_total += f_routed
    kernel_s, kernel_mode = 0.0, ""
    if tokens == 1 and m.kernel_rates:
        kernel_s = _kernel_s(ctx, dev_routed)
        kernel_mode = "add" if m.kernels_add_to_memory and overlap else "max"
        if kernel_mode == "max":
            compute_s = max(compute_s, kernel_s)
    memory_s = 0.0
    for i in range(n):
        t = m.tiers[i]
        if i <= c:
            ts = memory_bytes[i] / (t.read_bw * eff.memory) + (t.latency_s if memory_bytes[i] else 0.0)
            memory_s += ts
            traffic.append(TierTraffic(t.name, True, memory_bytes[i], 0.0, ts))
        else:
            mode, ts, bw, f = far_modes[i]
            traffic.append(TierTraffic(t.name, False, 0.0, served[i], ts, mode, bw, f))
    times = {"compute": compute_s, "memory": memory_s, "communication": comm_s}
    step = max(times.values()) if overlap else sum(times.values())
    if kernel_mode == "add":  # the same cores stream and compute: their times add (module doc)
        times["memory+compute"] = memory_s + kernel_s
        step = max(step, times["memory+compute"])
    # ties go to the first named (e.g. "memory" when no group's format has a kernel rate)
    bottleneck = max((k for k in RESOURCES if k in times), key=lambda k: times[k])
    return PhaseResult(name=name, tokens=tokens, tokens_per_s=tokens / step if step > 0 else math.inf,
                       step_time_s=step, compute_s=compute_s, memory_s=memory_s, communication_s=comm_s,
                       bottleneck=bottleneck, flops=flops_total, expected_unique_experts=unique_total,
                       tiers=tuple(traffic), kernel_s=kernel_s, kernel_mode=kernel_mode)


def _kernel_s(ctx: _Ctx, routed_on_device: float) -> float:
    """Seconds the native decode GEMVs need for one single-token step at the machine's measured
    per-format kernel rates (weights/s): every matrix the compute tier multiplies (always-on
    groups, the routed experts computed there), each at its stored format's rate. Groups whose
    format has no measured rate count as free here (they stay bounded by memory and FLOPs)."""
    m, cen, prec = ctx.machine, ctx.cen, ctx.prec
    total = 0.0
    for g in ALWAYS_ON_GROUPS:
        if g == "norms" or (g == "embedding" and not cen.head_is_embedding):
            continue  # vectors; the embedding is one row per token, copied
        r = m.kernel_rate(prec.format_of(g))
        if r and cen.groups[g].params:
            total += cen.groups[g].params / r
    r = m.kernel_rate(prec.format_of("routed_experts")) if routed_on_device else None
    if r:
        total += routed_on_device * cen.expert_params / r
    return total


def plan(spec: ModelSpec | str, machine: Machine | str, *, batch: int = 1, context: int = DEFAULT_CONTEXT,
         precision: str | Precision = "bf16", fast_mem: float | str | None = None,
         profile: Any = None, cache_bytes: float | str | None = None, overlap: bool = True,
         hit_rate: float | None = None) -> PlanResult:
    """Place ``spec`` on ``machine`` and predict decode / prefill throughput (see module doc).

    ``profile``: array ``[num_moe_layers, num_experts]`` of per-token selection probabilities
    (or frequencies / counts; rows are rescaled to sum to top_k). ``hit_rate``: override the
    placement's expected fraction of expert reads served by the fast tiers (a measured cache).
    ``spec`` / ``machine`` may also be names (resolved with ``resolve_model`` / ``get_machine``).
    """
    if isinstance(spec, str):
        from moetier.catalog import resolve_model

        spec = resolve_model(spec)
    if isinstance(machine, str):
        from moetier.planner.machines import get_machine

        machine = get_machine(machine)
    batch = _check_pos_int(batch, "batch")
    context = _check_pos_int(context, "context")
    fm = _check_opt_bytes(fast_mem, "fast_mem (--fast-mem)", allow_zero=False)
    _check_opt_bytes(cache_bytes, "cache_bytes (--cache)", allow_zero=True, whole=1.0)  # validate before census
    if hit_rate is not None and (isinstance(hit_rate, bool) or not 0.0 <= float(hit_rate) <= 1.0):
        raise PlanError(f"hit_rate: expected a fraction in [0, 1], got {hit_rate!r}")
    _validate_machine(machine)
    prec = parse_precision(precision) if not isinstance(precision, Precision) else precision
    cen = census(spec, prec)
    cb = _check_opt_bytes(cache_bytes, "cache_bytes (--cache)", allow_zero=True, whole=cen.routed_bytes)
    notes: list[str] = []
    if machine.source.startswith("moetier probe"):  # measured figures: say when and under what load
        notes.append(machine.source)
    if spec.is_moe:
        p = uniform_profile(spec) if profile is None else normalize_profile(profile, spec)
        notes.append("expert hotness: " + ("uniform top_k/E" if profile is None else "given profile")
                     + "; tokens routed independently")
    else:
        p = np.zeros((0, 0))
    kv_seq = kv_cache_bytes(spec, context)
    kv_total = kv_seq * batch
    c, group_tier, expert_tier, placement = _place(spec, machine, cen, p, kv_total, fm, cb, notes)
    ctx = _Ctx(spec, machine, cen, prec, c, group_tier, expert_tier, p, notes)
    decode = _phase(ctx, "decode", float(batch), kv_total, 0.0,
                    batch * attention_flops_decode(spec, context), overlap, hit_rate)
    prefill = _phase(ctx, "prefill", float(batch * context), 0.0, kv_total,
                     batch * attention_flops_prefill(spec, context), overlap, hit_rate)
    if hit_rate is not None:
        hr = float(hit_rate)
    elif p.size:
        u = expected_unique(p, batch)
        hr = float(u[(expert_tier >= 0) & (expert_tier <= c)].sum() / u.sum()) if u.sum() > 0 else 1.0
    else:
        hr = 1.0
    if context > spec.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings "
                     f"{spec.max_position_embeddings}")
    e = machine.efficiency
    notes += [
        f"efficiency (sustained/peak): compute {e.compute:g}, memory {e.memory:g}, link {e.link:g}",
        "step time = " + (("max(compute, memory + kernels, communication) (decode, batch 1)"
                           if machine.kernels_add_to_memory and machine.kernel_rates
                           else "max(compute, memory, communication)") + ": resources overlap" if overlap
                          else "compute + memory + communication: no overlap"),
        f"KV cache {KV_BYTES_PER_ELEMENT:g} bytes/element ("
        + ("MLA: kv_lora_rank + qk_rope_head_dim per token per layer" if spec.attention == "mla"
           else "GQA: 2 x kv_heads x head_dim per token per layer") + ")",
        "integer weight formats compute at bf16 (weight-only quantization)",
        *([("decode (batch 1): the native GEMVs' time at the measured per-format kernel rates "
            + ("adds to memory time (the same cores stream and compute: memory+compute)"
               if machine.kernels_add_to_memory and overlap else "is a floor on compute time")
            + " (moetier probe): " + ", ".join(f"{k} {v / 1e9:.1f} Gweights/s"
                                               for k, v in sorted(machine.kernel_rates.items())))]
          if machine.kernel_rates else []),
        "prefill: one forward over batch x context tokens; KV written once",
    ]
    return PlanResult(
        model=spec.name, machine=machine.name, precision=prec.name, batch=batch, context=context,
        overlap=overlap, decode=decode, prefill=prefill, placement=placement,
        efficiency={"compute": e.compute, "memory": e.memory, "link": e.link},
        expert_bytes=cen.expert_bytes, always_on_bytes=cen.always_on_bytes, routed_bytes=cen.routed_bytes,
        kv_bytes=kv_total, hit_rate=hr, assumptions=tuple(notes), machine_confidence=machine.confidence,
        expert_tier=expert_tier,
    )


def predict_decode_tokens_per_s(spec: ModelSpec | str, machine: Machine | str, *, hit_rate: float,
                                cache_bytes: float | None, precision: str | Precision = "bf16",
                                batch: int = 1, context: int = DEFAULT_CONTEXT) -> float:
    """Decode tokens/s with an expert cache of ``cache_bytes`` in the fast tiers (the rest of
    the experts in the farther tiers) serving a measured fraction ``hit_rate`` of expert reads."""
    return plan(spec, machine, batch=batch, context=context, precision=precision,
                cache_bytes=cache_bytes, hit_rate=hit_rate).decode_tokens_per_s


# --------------------------------------------------------------------------------------
# what-if

WHAT_IF_KEYS = {
    "flops": "scale (2x) or set (989T) every compute figure",
    "<precision>_flops": "one compute figure, e.g. fp8_flops=2x",
    "<tier>": "tier capacity, e.g. hbm=160GB; a new tier with CAP@BW (sram=230MB adds an SRAM "
              "tier nearest, default 80 TB/s as Groq LPU; other new tiers need @BW and go farthest)",
    "<tier>_bw": "tier read bandwidth, e.g. hbm_bw=2x (mem_bw = the compute tier)",
    "link_bw": "every link's bandwidth; <link>_bw for one link, e.g. pcie_bw=128GB/s",
    "host_flops": "in-place compute at the first farther tier (Fiddler), e.g. host_flops=2T",
    "<tier>_flops": "in-place compute at that tier",
    "cache": "expert-cache bytes in the fast tiers (cache_bytes)",
    "fast_mem": "cap on fast-tier capacity",
    "batch / context / precision": "plan parameters",
    "compute_eff / memory_eff / link_eff": "efficiency factors",
}


@dataclass(frozen=True)
class WhatIfResult:
    change: str
    before: PlanResult
    after: PlanResult

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change,
                "before": {"decode_tokens_per_s": self.before.decode_tokens_per_s,
                           "prefill_tokens_per_s": self.before.prefill_tokens_per_s,
                           "bottleneck": self.before.bottleneck},
                "after": self.after.to_json()}


def scale_or_set(old: float | None, text: str, what: str) -> float:
    """A what-if value: ``2x`` scales ``old``; anything else is an absolute quantity (``3TB/s``)."""
    t = text.strip()
    if t.lower().endswith("x"):
        try:
            f = float(t[:-1])
        except ValueError:
            raise PlanError(f"--what-if {what}: cannot read multiplier {text!r}") from None
        if f <= 0:
            raise PlanError(f"--what-if {what}: multiplier must be > 0, got {text!r}")
        if old is None:
            raise PlanError(f"--what-if {what}: the machine has no figure to scale; give a value")
        return old * f
    v = parse_quantity(t, f"--what-if {what}")
    if v <= 0:
        raise PlanError(f"--what-if {what}: must be > 0, got {text!r}")
    return v


def apply_what_if(machine: Machine, opts: dict[str, Any], change: str) -> tuple[Machine, dict[str, Any]]:
    """Apply one ``KEY=VALUE`` change to (machine, plan options); pure."""
    key, sep, val = change.partition("=")
    key, val = key.strip().lower(), val.strip()
    if not sep or not key or not val:
        raise PlanError(f"--what-if {change!r}: expected KEY=VALUE, e.g. hbm_bw=2x or sram=230MB")
    opts = dict(opts)
    m = machine
    tiers = list(m.tiers)
    tnames = [t.name for t in tiers]
    lnames = {lk.name for lk in m.links}
    c = tnames.index(m.compute_tier_name) if m.compute_tier_name in tnames else 0
    if key in ("batch", "context"):
        try:
            opts[key] = _check_pos_int(int(val), f"--what-if {key}")
        except ValueError:
            raise PlanError(f"--what-if {key}: expected a positive integer, got {val!r}") from None
        return m, opts
    if key == "precision":
        parse_precision(val)
        opts["precision"] = val
        return m, opts
    if key in ("cache", "cache_bytes", "fast_mem"):
        k = "fast_mem" if key == "fast_mem" else "cache_bytes"
        old = opts.get(k)
        if val.lower().endswith("x"):
            size = parse_size(old, "--cache") if isinstance(old, str) else None
            if size is not None and size.fraction is not None:  # a share of the routed experts, scaled
                opts[k] = f"{min(1.0, scale_or_set(size.fraction, val, key)) * 100:.6g}%"
            else:
                opts[k] = scale_or_set(size.bytes if size is not None else old, val, key)
        elif k == "cache_bytes":
            size = parse_size(val, f"--what-if {key}")
            opts[k] = val if size.fraction is not None else size.bytes  # a fraction resolves in plan()
        else:
            opts[k] = _check_opt_bytes(val, f"--what-if {key}", allow_zero=False)
        return m, opts
    if key in ("compute_eff", "memory_eff", "link_eff"):
        attr = key[:-4]
        x = scale_or_set(getattr(m.efficiency, attr), val, key)
        if x > 1:
            raise PlanError(f"--what-if {key}: efficiency must be <= 1, got {x:g}")
        return replace(m, efficiency=replace(m.efficiency, **{attr: x})), opts
    if key == "flops":
        if m.flops:
            return replace(m, flops={p: scale_or_set(v, val, key) for p, v in m.flops.items()}), opts
        return replace(m, flops={"bf16": scale_or_set(None, val, key)}), opts
    if key == "link_bw":
        if not m.links:
            raise PlanError(f"--what-if link_bw: machine {m.name!r} has no links")
        return replace(m, links=tuple(replace(lk, bw=scale_or_set(lk.bw, val, key)) for lk in m.links)), opts
    if key == "host_flops":
        host = next((n for n in tnames[c + 1:] if n in ("dram", "host")), None)
        if host is None:
            raise PlanError(f"--what-if host_flops: machine {m.name!r} has no host 'dram' tier beyond its "
                            f"compute tier {tnames[c]!r} (tiers: {', '.join(tnames)}); use <tier>_flops")
        key = f"{host}_flops"
    if key.endswith("_flops"):
        base = key[: -len("_flops")]
        if base in tnames:
            i = tnames.index(base)
            tiers[i] = replace(tiers[i], compute_flops=scale_or_set(tiers[i].compute_flops, val, key))
            return replace(m, tiers=tuple(tiers)), opts
        fl = dict(m.flops)
        fl[base] = scale_or_set(fl.get(base), val, key)
        return replace(m, flops=fl), opts
    if key.endswith("_bw"):
        base = key[: -len("_bw")]
        if base == "mem":
            base = tnames[c]
        if base in tnames:
            i = tnames.index(base)
            tiers[i] = replace(tiers[i], read_bw=scale_or_set(tiers[i].read_bw, val, key))
            return replace(m, tiers=tuple(tiers)), opts
        if base in lnames:
            return replace(m, links=tuple(replace(lk, bw=scale_or_set(lk.bw, val, key)) if lk.name == base
                                          else lk for lk in m.links)), opts
        raise PlanError(f"--what-if {key}: no tier or link {base!r}; tiers: {', '.join(tnames)}; links: "
                        f"{', '.join(sorted(lnames)) or 'none'}")
    if key.replace("-", "_").isidentifier():
        cap_s, at, bw_s = val.partition("@")
        if key in tnames:
            i = tnames.index(key)
            t = tiers[i]
            t = replace(t, capacity_bytes=scale_or_set(t.capacity_bytes, cap_s, key))
            if at:
                t = replace(t, read_bw=scale_or_set(t.read_bw, bw_s, key + " bandwidth"))
            tiers[i] = t
            return replace(m, tiers=tuple(tiers)), opts
        if key in WHAT_IF_KEYS or key in ("sram",) or at:
            cap = scale_or_set(None, cap_s, key)
            if at:
                bw = scale_or_set(None, bw_s, key + " bandwidth")
            elif key == "sram":
                bw = DEFAULT_SRAM_BW
            else:
                raise PlanError(f"--what-if {key}: new tier needs a bandwidth, e.g. {key}=2TB@7GB/s")
            new = MemoryTier(key, cap, bw)
            if key == "sram":
                return replace(m, tiers=(new, *tiers), compute_tier=tnames[c]), opts
            return replace(m, tiers=(*tiers, new), compute_tier=tnames[c]), opts
    raise PlanError(f"--what-if {change!r}: unknown key {key!r}; keys: {', '.join(WHAT_IF_KEYS)} "
                    f"(tiers here: {', '.join(tnames)}; links: {', '.join(sorted(lnames)) or 'none'})")


_PLAN_OPTS = ("batch", "context", "precision", "fast_mem", "profile", "cache_bytes", "overlap", "hit_rate")


def what_if(spec: ModelSpec | str, machine: Machine | str, changes: Sequence[str],
            **plan_kw: Any) -> list[WhatIfResult]:
    """Each change applied alone to the base plan; if several, also all of them together."""
    bad = set(plan_kw) - set(_PLAN_OPTS)
    if bad:
        raise TypeError(f"what_if: unknown plan options {sorted(bad)}")
    if not changes:
        raise PlanError("--what-if: give at least one KEY=VALUE")
    if isinstance(machine, str):
        from moetier.planner.machines import get_machine

        machine = get_machine(machine)
    before = plan(spec, machine, **plan_kw)
    out = []
    combos = [[ch] for ch in changes] + ([list(changes)] if len(changes) > 1 else [])
    for combo in combos:
        m, opts = machine, dict(plan_kw)
        for ch in combo:
            m, opts = apply_what_if(m, opts, ch)
        out.append(WhatIfResult(" + ".join(combo), before, plan(spec, m, **opts)))
    return out


# --------------------------------------------------------------------------------------
# display


def format_plan(r: PlanResult, machine: Machine | None = None) -> str:
    """Compact human table (units formatted here only)."""
    lines = [f"plan: {r.model} on {r.machine} (confidence {r.machine_confidence}), {r.precision}, "
             f"batch {r.batch}, context {r.context}"]
    routed = (f", routed {fmt_bytes(r.routed_bytes)} ({fmt_bytes(r.expert_bytes)} per expert)"
              if r.expert_tier.size else " (dense model)")
    lines.append(f"  weights: always-on {fmt_bytes(r.always_on_bytes)}{routed}, KV cache {fmt_bytes(r.kv_bytes)}")
    lines.append("")
    lines.append(f"  {'tier':8s} {'capacity':>10s} {'used':>10s}  holds")
    for t in r.placement:
        holds = []
        if t.groups:
            holds.append("+".join(t.groups))
        if t.kv_bytes:
            holds.append(f"KV {fmt_bytes(t.kv_bytes)}")
        if t.experts:
            holds.append(f"{t.experts} experts")
        lines.append(f"  {t.name + ('*' if t.fast else ''):8s} {fmt_bytes(t.capacity_bytes):>10s} "
                     f"{fmt_bytes(t.used_bytes):>10s}  {', '.join(holds) or '-'}")
    lines.append("  (* = fast tier, read directly by compute)")
    for ph in (r.decode, r.prefill):
        lines.append("")
        lines.append(f"  {ph.name} ({ph.tokens:g} tokens/step): {fmt_tokens_per_s(ph.tokens_per_s)}, "
                     f"step {fmt_seconds(ph.step_time_s)}, bound by {ph.bottleneck}")
        lines.append(f"    compute        {fmt_seconds(ph.compute_s):>10s}  {fmt_si(ph.flops, 'FLOP')}")
        for t in ph.tiers:
            if t.fast:
                lines.append(f"    memory {t.name:7s} {fmt_seconds(t.time_s):>10s}  {fmt_bytes(t.read_bytes)} read")
            elif t.mode:
                how = f"moved at {fmt_si(t.path_bw, 'B/s')}"
                if t.mode != "move":
                    how = (f"{100 * t.moved_fraction:.0f}% {how}, {100 * (1 - t.moved_fraction):.0f}% "
                           "computed in place")
                lines.append(f"    comm {t.name:9s} {fmt_seconds(t.time_s):>10s}  {fmt_bytes(t.served_bytes)} "
                             f"{how}")
        if ph.kernel_mode:
            how = ("added to memory: the same cores stream and compute" if ph.kernel_mode == "add"
                   else "a floor on compute")
            lines.append(f"    kernels        {fmt_seconds(ph.kernel_s):>10s}  native GEMVs at the measured "
                         f"kernel rates ({how})")
        both = (f" | memory+compute {fmt_seconds(ph.memory_compute_s)}" if ph.kernel_mode == "add" else "")
        lines.append(f"    => compute {fmt_seconds(ph.compute_s)} | memory {fmt_seconds(ph.memory_s)}{both} | "
                     f"communication {fmt_seconds(ph.communication_s)}")
    lines.append("")
    if r.expert_tier.size:
        lines.append(f"  expected expert hit rate in fast tiers (decode): {r.hit_rate:.3f}")
    for a in r.assumptions:
        lines.append(f"  assumes: {a}")
    return "\n".join(lines)


def format_what_if(results: Sequence[WhatIfResult]) -> str:
    if not results:
        return ""
    b = results[0].before
    rows = [("(base)", b)] + [(w.change, w.after) for w in results]
    width = max(len(n) for n, _ in rows)
    lines = [f"what-if: {b.model} on {b.machine}, {b.precision}, batch {b.batch}, context {b.context}",
             f"  {'change':{width}s} {'decode':>14s} {'prefill':>14s}  {'binds (decode)':14s} "
             f"{'compute':>9s} {'memory':>9s} {'comm':>9s}"]
    for n, r in rows:
        d = r.decode
        lines.append(f"  {n:{width}s} {fmt_tokens_per_s(r.decode_tokens_per_s):>14s} "
                     f"{fmt_tokens_per_s(r.prefill_tokens_per_s):>14s}  {r.bottleneck:14s} "
                     f"{fmt_seconds(d.compute_s):>9s} {fmt_seconds(d.memory_s):>9s} "
                     f"{fmt_seconds(d.communication_s):>9s}")
    for w in results:
        before, after = w.before, w.after
        ratio = after.decode_tokens_per_s / before.decode_tokens_per_s if before.decode_tokens_per_s else math.inf
        move = (f"bottleneck moves {before.bottleneck} -> {after.bottleneck}"
                if after.bottleneck != before.bottleneck else f"still {after.bottleneck}-bound")
        lines.append(f"  {w.change}: decode x{ratio:.3g}, {move}")
    e = b.efficiency
    lines.append(f"  efficiency: compute {e['compute']:g}, memory {e['memory']:g}, link {e['link']:g}; "
                 f"{'overlap (max)' if b.overlap else 'no overlap (sum)'}")
    return "\n".join(lines)
