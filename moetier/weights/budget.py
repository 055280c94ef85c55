"""The hard RAM budget (``--max-ram``): resident + cache + KV cache + activations.

Accounting (all bytes):

* ``process``    - the interpreter, torch and libraries: the process RSS measured before any
                   weight is loaded (``baseline_rss``), or 400 MB when it was not measured;
* ``always_on``  - the always-on weights (census of the model at the runtime dtype), or once
                   loaded, the measured RSS growth while they were loaded;
* ``pinned``     - routed experts the plan pins resident (slots);
* ``cache``      - the expert-cache slots (what is left goes here);
* ``transient``  - prefetch slots (``prefetch_max_inflight_bytes``) + 2 bypass slots;
* ``kv``         - the KV cache of ``batch`` sequences of ``context`` tokens (runtime dtype);
* ``activations``- a bound for one forward of ``prefill_tokens`` tokens (hidden copies, q/k/v,
                   attention scores per head in float32, the widest FFN intermediate, and the
                   float32 logits of the last token per sequence);
* ``margin``     - what the process grows by after the sizing: library code pages faulted in
                   by the first forwards (shared, but counted in RSS and charged to a cgroup),
                   allocator slack: max(192 MB, 6 % of the budget) (measured: ~190 MB on
                   a 3 GB run with torch 2.x).

Before loading, :func:`check_upfront` refuses a budget that cannot hold process + always-on
+ KV + activations + margin + the minimum expert working set (``top_k`` cache slots plus
the transient slots), naming the number needed. After the always-on weights are loaded,
:func:`cache_slots_for` sizes the cache from the *measured* RSS, so what the process really
holds (not an estimate of it) is charged.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from moetier.errors import ConfigError
from moetier.spec import ModelSpec

DEFAULT_PROCESS_BYTES = 400 * 10**6


class BudgetError(ConfigError):
    """``--max-ram`` is too small for this model and these settings."""


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas (``M_ARENA_MAX``) for this process.

    glibc gives each thread that allocates (torch's workers, the prefetch reader) its own
    arena of up to 64 MB, whose touched pages count in RSS and in a cgroup; under a hard
    ``--max-ram`` that slack is unpredictable, so the budgeted runtime caps it. Returns False
    where it cannot (not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX = -8
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def fmt(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass
class MemoryBudget:
    """One run's RAM budget and, once sized, its breakdown."""

    max_ram: int
    context: int = 4096
    batch: int = 1
    prefill_tokens: int = 512
    itemsize: int = 2
    baseline_rss: int | None = None  # process RSS before loading weights
    # filled as the load proceeds
    always_on_bytes: int = 0
    loaded_rss: int | None = None  # RSS after the always-on weights were loaded
    kv_bytes: int = 0
    activation_bytes: int = 0
    margin_bytes: int = 0
    slot_bytes: int = 0
    cache_slots: int = 0
    pinned_slots: int = 0
    prefetch_slots: int = 0
    bypass_slots: int = 0

    @property
    def total_reserved(self) -> int:
        slots = self.cache_slots + self.pinned_slots + self.prefetch_slots + self.bypass_slots
        base = self.loaded_rss if self.loaded_rss is not None else (
            (self.baseline_rss or DEFAULT_PROCESS_BYTES) + self.always_on_bytes)
        return base + slots * self.slot_bytes + self.kv_bytes + self.activation_bytes + self.margin_bytes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_reserved"] = self.total_reserved
        d["cache_bytes"] = self.cache_slots * self.slot_bytes
        return d


def kv_cache_bytes(spec: ModelSpec, context: int, batch: int, itemsize: int) -> int:
    """KV cache of ``batch`` sequences of ``context`` tokens as the runtime stores it."""
    if spec.attention == "mla":  # the runtime caches the projected k (nope+rope) and v per head
        per = spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim)
    else:
        per = 2 * spec.num_kv_heads * spec.head_dim
    # sequences grow their cache by doubling: up to 2x the tokens held
    return int(per * itemsize * spec.num_layers * context * batch * 2)


def activation_bytes(spec: ModelSpec, tokens: int, context: int, batch: int, itemsize: int) -> int:
    """Upper estimate of the transient tensors of one forward of ``tokens`` new tokens."""
    H = spec.hidden_size
    q = spec.num_heads * max(spec.head_dim, spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    kv = 2 * spec.num_kv_heads * spec.head_dim
    ffn = max(spec.intermediate_size if spec.num_dense_layers else 0, spec.expert_intermediate_size,
              spec.shared_expert_intermediate_size)
    per_token = (8 * H + 2 * (q + kv) + 3 * ffn) * 4  # float32 worst case (norm statistics, router)
    scores = spec.num_heads * tokens * min(context, tokens + context) * 4
    logits = batch * spec.vocab_size * 4 * 2
    return int(tokens * per_token + scores + logits + spec.num_experts * tokens * 4 * 2)


def margin_for(max_ram: int) -> int:
    return int(max(192e6, 0.06 * max_ram))


def _fill_reserves(spec: ModelSpec, b: MemoryBudget) -> None:
    b.kv_bytes = kv_cache_bytes(spec, b.context, b.batch, b.itemsize)
    b.activation_bytes = activation_bytes(spec, min(b.prefill_tokens, b.context), b.context, b.batch, b.itemsize)
    b.margin_bytes = margin_for(b.max_ram)


def check_upfront(spec: ModelSpec, budget: MemoryBudget, *, always_on_bytes: float, slot_bytes: int,
                  transient_slots: int, pinned_slots: int = 0) -> None:
    """Refuse (BudgetError with the number needed) a budget that cannot hold the minimum."""
    _fill_reserves(spec, budget)
    budget.always_on_bytes = int(always_on_bytes)
    base = budget.baseline_rss or DEFAULT_PROCESS_BYTES
    min_slots = spec.top_k + transient_slots + pinned_slots
    need = (base + budget.always_on_bytes + budget.kv_bytes + budget.activation_bytes + budget.margin_bytes
            + min_slots * slot_bytes)
    if budget.max_ram < need:
        raise BudgetError(
            f"--max-ram {fmt(budget.max_ram)} is too small for {spec.name}: it needs at least {fmt(need)} "
            f"(process {fmt(base)} + always-on weights {fmt(budget.always_on_bytes)} + KV cache "
            f"{fmt(budget.kv_bytes)} for {budget.batch}x{budget.context} tokens + activations "
            f"{fmt(budget.activation_bytes)} + {min_slots} expert slots of {fmt(slot_bytes)} + margin "
            f"{fmt(budget.margin_bytes)}); raise --max-ram to >= {math.ceil(need / 1e6)}MB or lower --context"
        )


def cache_slots_for(spec: ModelSpec, plan: Any, *, slot_bytes: int, n_pinned: int, prefetch_slots: int,
                    bypass_slots: int, budget: MemoryBudget | None = None) -> int:
    """Cache slots that fit ``plan.max_ram`` given the RSS measured now (always-on loaded)."""
    b = budget or MemoryBudget(max_ram=int(plan.max_ram))
    if not b.kv_bytes:
        _fill_reserves(spec, b)
    b.loaded_rss = rss_bytes()
    fixed = (b.loaded_rss + b.kv_bytes + b.activation_bytes + b.margin_bytes
             + (n_pinned + prefetch_slots + bypass_slots) * slot_bytes)
    n = (b.max_ram - fixed) // slot_bytes
    if n < spec.top_k:
        need = fixed + spec.top_k * slot_bytes
        raise BudgetError(
            f"--max-ram {fmt(b.max_ram)} is too small for {spec.name}: after loading the always-on weights "
            f"the process holds {fmt(b.loaded_rss)}; with KV cache {fmt(b.kv_bytes)}, activations "
            f"{fmt(b.activation_bytes)}, {n_pinned + prefetch_slots + bypass_slots} pinned/transient slots and "
            f"{spec.top_k} cache slots of {fmt(slot_bytes)} it needs {fmt(need)}; raise --max-ram to >= "
            f"{math.ceil(need / 1e6)}MB"
        )
    return int(n)


def record(spec: ModelSpec, budget: MemoryBudget, *, slot_bytes: int, cache_slots: int, n_pinned: int,
           prefetch_slots: int, bypass_slots: int) -> None:
    budget.slot_bytes = slot_bytes
    budget.cache_slots = cache_slots
    budget.pinned_slots = n_pinned
    budget.prefetch_slots = prefetch_slots
    budget.bypass_slots = bypass_slots
    if not budget.kv_bytes:
        _fill_reserves(spec, budget)
    if budget.loaded_rss is None:
        budget.loaded_rss = rss_bytes()
    if budget.total_reserved > budget.max_ram:
        raise BudgetError(
            f"--max-ram {fmt(budget.max_ram)}: the expert cache of {cache_slots} slots "
            f"({fmt(cache_slots * slot_bytes)}) "
            f"does not fit: the run would reserve {fmt(budget.total_reserved)} (process with always-on weights "
            f"{fmt(budget.loaded_rss)}, KV {fmt(budget.kv_bytes)}, activations {fmt(budget.activation_bytes)}, "
            f"margin {fmt(budget.margin_bytes)}); lower --expert-cache or raise --max-ram"
        )
