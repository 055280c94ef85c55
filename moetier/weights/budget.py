"""The hard RAM budget (``--max-ram``): resident + cache + KV cache + activations.

Accounting (all bytes):

* ``process``    - the interpreter, torch and libraries: the process RSS measured before any
                   weight is loaded (``baseline_rss``), or 400 MB when it was not measured;
* ``always_on``  - the always-on weights (census of the model at the runtime dtype), or once
                   loaded, the measured RSS growth while they were loaded;
* ``pinned``     - routed experts the plan pins resident (slots);
* ``cache``      - the expert-cache slots (what is left goes here);
* ``transient``  - prefetch slots (``prefetch_max_inflight_bytes``) + 2 bypass slots;
* ``native``     - plain copies the native decoder makes after the cache is sized: the MLA
                   ``kv_b_proj`` in the model dtype when it is stored quantized (FP8 releases,
                   ``--quantize-all``; ``native/mla.py: plain_kv_b``; DeepSeek-V3 bf16: 2.0 GB),
                   charged before loading from the spec (``tiered.native_copy_bytes``) because
                   the measured RSS after loading does not hold them yet; 0 for other models;
* ``kv``         - the KV cache of ``batch`` sequences of ``context`` tokens (runtime dtype);
* ``activations``- a bound for one forward of ``prefill_tokens`` tokens (hidden copies, q/k/v,
                   attention scores per head in float32, the widest FFN intermediate, and the
                   float32 logits of the last token per sequence);
* ``requests``   - ``moetier serve`` only: request bodies being read and parsed, tokenising, the
                   token ids of waiting and running requests (``serve/memory.py``); 0 otherwise;
* ``margin``     - what the process grows by after the sizing: library code pages faulted in
                   by the first forwards (shared, but counted in RSS and charged to a cgroup),
                   allocator slack: max(192 MB, 6 % of the budget) (measured: ~190 MB on
                   a 3 GB run with torch 2.x).

One estimate, made before loading, that holds: :func:`check_upfront` adds process +
``loading`` (what reading a checkpoint adds besides its weights: the tokenizer, the native
library, thread stacks; :func:`loading_bytes`) + always-on + native copies + KV + activations + requests + margin + the
expert slots these options ask for (an explicit ``--expert-cache``, else ``top_k`` cache
slots, plus pinned, prefetch and bypass slots) and refuses a smaller budget, naming the
smallest ``--max-ram`` that works and what each option moves it by. After the always-on
weights are loaded, :func:`cache_slots_for` sizes the cache from the *measured* RSS, so what
the process really holds (not an estimate of it) is charged; the estimate is an upper bound
of that measurement, so a budget the first check accepted is not refused after loading.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from moetier.errors import ConfigError
from moetier.spec import ModelSpec

DEFAULT_PROCESS_BYTES = 400 * 10**6
# RSS that loading adds besides the weights (tokenizer, native library, thread stacks, malloc
# arenas): measured 20 MB for the embedded model (2-core EPYC, torch 2.13); 2.4x headroom
LOADING_BYTES = 48 * 10**6
TOKENIZER_RSS_PER_JSON_BYTE = 12  # the tokenizers library holds ~10x its tokenizer.json in RAM


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
    """Bytes for a person: ``2.35 GB``, ``627 MB``, ``6.3 MB``, ``197 kB``."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e7:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB"


def loading_bytes(model_dir: Any = None) -> int:
    """RSS loading adds besides the weights: :data:`LOADING_BYTES` plus the tokenizer's share."""
    from pathlib import Path

    tok = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
    extra = tok.stat().st_size * TOKENIZER_RSS_PER_JSON_BYTE if tok is not None and tok.is_file() else 0
    return LOADING_BYTES + int(extra)


@dataclass
class MemoryBudget:
    """One run's RAM budget and, once sized, its breakdown."""

    max_ram: int
    context: int = 4096
    batch: int = 1
    prefill_tokens: int = 512
    itemsize: int = 2
    baseline_rss: int | None = None  # process RSS before loading weights
    loading_bytes: int = 0  # estimated RSS loading adds besides the weights
    estimated_total: int = 0  # check_upfront's estimate of total_reserved (an upper bound)
    request_bytes: int = 0  # the server's request memory (serve/memory.py), 0 outside `moetier serve`
    native_bytes: int = 0  # plain copies the native decoder makes after loading (MLA kv_b_proj stored quantized)
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
        return (base + self.native_bytes + slots * self.slot_bytes + self.kv_bytes + self.activation_bytes
                + self.request_bytes + self.margin_bytes)

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


def smallest_max_ram(fixed: int) -> int:
    """The smallest budget M with fixed + margin_for(M) <= M (the margin grows with M)."""
    m = max(fixed + margin_for(0), math.ceil(fixed / 0.94))
    while fixed + margin_for(m) > m:  # rounding of margin_for
        m += 1
    while m > 0 and fixed + margin_for(m - 1) <= m - 1:
        m -= 1
    return m


def check_upfront(spec: ModelSpec, budget: MemoryBudget, *, always_on_bytes: float, slot_bytes: int,
                  transient_slots: int, pinned_slots: int = 0, cache_slots: int | None = None,
                  prefetch_slots: int = 0, cache_option: str | None = None) -> int:
    """Refuse (BudgetError) a budget below the estimate for these options, naming the smallest
    ``--max-ram`` that works and what each option moves it by; return that smallest budget.

    ``cache_slots``: the slots an explicit ``--expert-cache`` asks for (``cache_option`` is
    its text), else None: the cache takes what is left, at least ``top_k`` slots.
    ``transient_slots`` includes ``prefetch_slots``."""
    _fill_reserves(spec, budget)
    budget.always_on_bytes = int(always_on_bytes)
    base = budget.baseline_rss or DEFAULT_PROCESS_BYTES
    n_cache = spec.top_k if cache_slots is None else max(int(cache_slots), 0)
    n_slots = n_cache + transient_slots + pinned_slots
    fixed = (base + budget.loading_bytes + budget.always_on_bytes + budget.native_bytes + budget.kv_bytes
             + budget.activation_bytes + budget.request_bytes + n_slots * slot_bytes)
    smallest = smallest_max_ram(fixed)
    budget.estimated_total = fixed + budget.margin_bytes
    if budget.max_ram >= smallest:
        return smallest
    cache_what = (f"--expert-cache {cache_option} = {n_cache} slots" if cache_option is not None
                  else f"{n_cache} cache slots (the minimum, top_k)")
    moves = [f"--context: {fmt(kv_cache_bytes(spec, 1000, budget.batch, budget.itemsize))} of KV cache per "
             f"1,000 tokens ({budget.context} now)"]
    if cache_option is not None and n_cache > spec.top_k:
        moves.append(f"--expert-cache: {fmt(slot_bytes)} per expert slot ({n_cache} now; without it the cache "
                     f"takes what is left of the budget, at least {spec.top_k} slots)")
    if prefetch_slots:
        moves.append(f"--no-prefetch: -{fmt(prefetch_slots * slot_bytes)}")
    if budget.itemsize == 4:
        moves.append(f"--dtype bfloat16: about -{fmt(budget.always_on_bytes / 2 + budget.kv_bytes / 2)}")
    if budget.request_bytes:
        moves.append(f"requests: {fmt(budget.request_bytes)} (--request-ram for bodies being read, --max-queue and "
                     "--max-batch for token ids held, --context)")
    moves.append(f"the margin is max({fmt(margin_for(0))}, 6% of --max-ram)")
    raise BudgetError(
        f"--max-ram {fmt(budget.max_ram)} is too small for {spec.name} with these options: the smallest that "
        f"works is --max-ram {math.ceil(smallest / 1e6)}M (process {fmt(base)} + loading "
        f"{fmt(budget.loading_bytes)} + always-on weights {fmt(budget.always_on_bytes)}{_nat(budget)} + KV cache "
        f"{fmt(budget.kv_bytes)} for {budget.batch}x{budget.context} tokens + activations "
        f"{fmt(budget.activation_bytes)}{_req(budget)} + {n_slots} expert slots of {fmt(slot_bytes)} ({cache_what}, "
        f"{transient_slots} transient, {pinned_slots} pinned) + margin {fmt(margin_for(smallest))}). "
        f"What moves it: " + "; ".join(moves)
    )


def cache_slots_for(spec: ModelSpec, plan: Any, *, slot_bytes: int, n_pinned: int, prefetch_slots: int,
                    bypass_slots: int, budget: MemoryBudget | None = None) -> int:
    """Cache slots that fit ``plan.max_ram`` given the RSS measured now (always-on loaded)."""
    b = budget or MemoryBudget(max_ram=int(plan.max_ram))
    if not b.kv_bytes:
        _fill_reserves(spec, b)
    b.loaded_rss = rss_bytes()
    # native copies are made after this measurement (the native decoder is built after the provider)
    fixed = (b.loaded_rss + b.native_bytes + b.kv_bytes + b.activation_bytes + b.request_bytes + b.margin_bytes
             + (n_pinned + prefetch_slots + bypass_slots) * slot_bytes)
    n = (b.max_ram - fixed) // slot_bytes
    if n < spec.top_k:
        need = fixed + spec.top_k * slot_bytes
        raise BudgetError(
            f"--max-ram {fmt(b.max_ram)} is too small for {spec.name}: after loading the always-on weights "
            f"the process holds {fmt(b.loaded_rss)}; with{_nat(b, '', ',')} KV cache {fmt(b.kv_bytes)}, activations "
            f"{fmt(b.activation_bytes)}{_req(b, ',')}, {n_pinned + prefetch_slots + bypass_slots} pinned/transient "
            f"slots and "
            f"{spec.top_k} cache slots of {fmt(slot_bytes)} it needs {fmt(need)}{_off(b)}; raise --max-ram to >= "
            f"{math.ceil(smallest_max_ram(need - b.margin_bytes) / 1e6)}M"
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
            f"{fmt(budget.loaded_rss)},{_nat(budget, '', ',')} KV {fmt(budget.kv_bytes)}, activations "
            f"{fmt(budget.activation_bytes)}"
            f"{_req(budget, ',')}, margin {fmt(budget.margin_bytes)}){_off(budget)}; lower --expert-cache or raise "
            f"--max-ram to >= "
            f"{math.ceil(smallest_max_ram(budget.total_reserved - budget.margin_bytes) / 1e6)}M"
        )


def _req(b: MemoryBudget, sep: str = " +") -> str:
    return f"{sep} requests {fmt(b.request_bytes)}" if b.request_bytes else ""


def _nat(b: MemoryBudget, sep: str = " +", end: str = "") -> str:
    return f"{sep} native decoder copies {fmt(b.native_bytes)}{end}" if b.native_bytes else ""


def _off(b: MemoryBudget) -> str:
    """How far the measured load exceeded the estimate made before loading (a bug to report)."""
    if b.loaded_rss is None or not b.always_on_bytes:
        return ""
    est = (b.baseline_rss or DEFAULT_PROCESS_BYTES) + b.loading_bytes + b.always_on_bytes
    if b.loaded_rss <= est:
        return ""
    return f" (loading took {fmt(b.loaded_rss - est)} more than estimated before loading)"
