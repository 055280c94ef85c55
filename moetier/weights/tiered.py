"""The tiered expert provider: resident / cache / store behind the ExpertProvider interface.

:class:`TieredExpertProvider` serves routed experts to the MoE layers
(``require(layer, ids)`` then ``get(layer, e)``, see :mod:`moetier.models.base`):

* experts of tier ``resident`` (PlacementPlan rules) are read once at load into their own
  slots and never evicted;
* experts of tier ``cache`` go through :class:`~moetier.weights.cache.ExpertCache` (the
  policy objects of :mod:`moetier.weights.policies`, called as documented there). On
  ``require`` every miss is submitted to the :class:`~moetier.weights.prefetch.IOWorker`
  at once, so reading expert ``j+1`` overlaps computing expert ``j``; ``get`` waits for its
  own read only (that wait is the *stall* time);
* experts of tier ``store`` and misses the policy does not admit are *bypassed*: read into
  one of a few transient slots, used for this step, released.

Slot lifetime contract (what ``moetier.layers.moe.dispatch`` does): the weights returned by
``get`` for a cached or pinned expert stay valid until the next ``require``; for a
bypassed expert until the next ``get`` or ``require``.

With prefetch on, a :class:`~moetier.weights.prefetch.RouterPrefetcher` calls
:meth:`TieredExpertProvider.prefetch` with the next layer's guessed experts; their reads go
into prefetch slots (bounded in-flight bytes) and are handed over (no copy: the slot itself
changes owner) when the layer asks for them.

Pool: ``cache capacity + prefetch slots + 2 bypass slots``, all preallocated.
Bit-identical to the in-RAM provider: same bytes, same dtype, same contiguous shapes.

:func:`tiered_factory` builds the ``expert_provider_factory`` for ``moetier.load``;
:func:`bind` installs the step counter and the prefetch hooks on the loaded model and
exposes the metrics as ``model.hierarchy_metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from moetier.errors import MoetierError
from moetier.models.base import ExpertReader, ExpertWeights
from moetier.spec import ModelSpec
from moetier.weights.cache import ExpertCache, Key, SlotPool
from moetier.weights.metrics import HierarchyMetrics
from moetier.weights.plan import PlacementPlan
from moetier.weights.prefetch import IOWorker, ReadJob, RouterPrefetcher
from moetier.weights.store import DEFAULT_IO_THREADS, ExpertStore

BYPASS_SLOTS = 2


class TieredExpertProvider:
    """Resident + cache + store expert provider (see module docstring)."""

    def __init__(self, spec: ModelSpec, reader: ExpertReader, plan: PlacementPlan, *,
                 cache_slots: int, prefetch_slots: int = 0, profile: Any = None, io: str = "auto",
                 check_finite: bool = True, io_threads: int = DEFAULT_IO_THREADS, store: ExpertStore | None = None,
                 metrics: HierarchyMetrics | None = None, touch: bool = True):
        self.spec, self.plan = spec, plan
        self.store = store or ExpertStore(reader, io=io, check_finite=check_finite)
        self.layout = self.store.layout
        self.slot_bytes = self.layout.slot_bytes
        self.metrics = metrics or HierarchyMetrics()
        self.metrics.expert_bytes = self.layout.expert_bytes
        self.tiers = plan.expert_tiers(spec)
        layers = spec.moe_layer_ids
        if plan.policy == "static" and profile is None and "profile" not in plan.policy_params:
            raise MoetierError("policy 'static' needs a routing profile (per-layer per-expert counts): pass "
                               "profile= or a --profile file")
        self.cache = ExpertCache(layers, max(0, int(cache_slots)), plan.policy, plan.policy_params,
                                 plan.cache_scope, profile)
        self.prefetch_slots = max(0, int(prefetch_slots))
        self.pool = SlotPool(self.cache.capacity + self.prefetch_slots + BYPASS_SLOTS, self.slot_bytes)
        if touch:
            self.pool.touch()
        self.worker = IOWorker(self.store, self.pool.slot, self.metrics, threads=io_threads)
        # per slot and layout variant (layers storing experts differently), made once
        self._views = [self.layout.all_views(self.pool.slot(i)) for i in range(self.pool.n)]
        # resident (pinned) experts: own slots, read once
        pinned_keys = sorted(k for k, t in self.tiers.items() if t == "resident")
        self.pinned_pool = SlotPool(len(pinned_keys), self.slot_bytes) if pinned_keys else None
        self.pinned: dict[Key, ExpertWeights] = {}
        for i, (layer, e) in enumerate(pinned_keys):
            assert self.pinned_pool is not None
            self.pinned[(layer, e)] = self.store.read_into(layer, e, self.pinned_pool.slot(i))
        # per-step state (main thread only)
        self.current: dict[Key, tuple[str, ReadJob | None]] = {}
        self.consumed_bypass: list[ReadJob] = []
        self.prefetched: dict[Key, ReadJob] = {}
        self.zombies: list[ReadJob] = []  # cancelled reads still holding a slot
        self.n_prefetch_used = 0
        self.n_bypass_used = 0
        self.guesses: dict[int, set[int]] = {}
        self.step = 0
        self.decoding = False  # the current step is a decode step (set by on_step)
        # a static policy's pinned set is resident from the start: fill it now
        self.warm()

    # ----- sizes -----
    @property
    def cache_bytes(self) -> int:
        return self.cache.capacity * self.slot_bytes

    @property
    def pinned_bytes(self) -> int:
        return 0 if self.pinned_pool is None else self.pinned_pool.nbytes

    @property
    def nbytes(self) -> int:
        """RAM held for routed experts (all slots, pinned included)."""
        return self.pool.nbytes + self.pinned_bytes

    def describe(self) -> dict[str, Any]:
        return {
            **self.cache.describe(),
            "slot_bytes": self.slot_bytes,
            "expert_bytes": self.layout.expert_bytes,
            "cache_bytes": self.cache_bytes,
            "pinned_experts": len(self.pinned),
            "pinned_bytes": self.pinned_bytes,
            "prefetch_slots": self.prefetch_slots,
            "bypass_slots": BYPASS_SLOTS,
            "io": self.store.io,
        }

    def warm(self) -> None:
        """Read the experts the policies hold resident but that are not loaded (static)."""
        keys = [k for k in self.cache.resident_keys() if self.tiers.get(k) == "cache" and k not in self.cache.valid]
        for key in keys:
            s = self.cache.slot_of.get(key)
            if s is None:
                s = self.pool.acquire()
                assert s is not None
                self.cache.slot_of[key] = s
            self.store.read_into(key[0], key[1], self.pool.slot(s))
            self.cache.mark_valid(key)

    # ----- slot helpers -----
    def _release(self, slot: int) -> None:
        self.pool.release(slot)

    def _reap(self) -> None:
        keep = []
        for j in self.zombies:
            if j.done.is_set():
                if j.nbytes:
                    self.metrics.add_wasted(j.nbytes)
                self.pool.release(j.slot)
                self.n_prefetch_used -= 1
            else:
                keep.append(j)
        self.zombies = keep

    def _discard_prefetch(self, job: ReadJob) -> None:
        job.cancelled = True
        self.zombies.append(job)

    def _wait(self, job: ReadJob) -> None:
        if not job.done.is_set():
            if job.prefetch:
                self.worker.promote(job)
            t0 = time.perf_counter()
            job.done.wait()
            self.metrics.stall_seconds += time.perf_counter() - t0

    def _submit(self, layer: int, e: int, slot: int, prefetch: bool) -> ReadJob:
        return self.worker.submit(ReadJob(layer, e, slot, prefetch))

    def finish_layer(self) -> None:
        """Settle the previous layer: wait for its outstanding reads, free bypass slots."""
        for key, (kind, job) in self.current.items():
            if job is None:
                continue
            job.done.wait()
            if kind == "cache":
                if job.error is None:
                    self.cache.mark_valid(key)
                else:
                    self.cache.mark_invalid(key)
            elif job not in self.consumed_bypass:
                self.consumed_bypass.append(job)
        self.current = {}
        self._free_consumed_bypass()
        self._reap()

    def _free_consumed_bypass(self) -> None:
        for job in self.consumed_bypass:
            job.done.wait()
            self.pool.release(job.slot)
            self.n_bypass_used -= 1
        self.consumed_bypass = []

    # ----- the ExpertProvider interface -----
    def require(self, layer: int, expert_ids: Seq[int]) -> None:
        self.finish_layer()
        needed = [int(e) for e in expert_ids]
        ns = set(needed)
        g = self.guesses.pop(layer, None)
        if g is not None:
            m = self.metrics
            m.pf_guesses += len(g)
            m.pf_correct += len(g & ns)
            m.pf_actual += len(ns)
        # prefetches for this layer that were not needed, or stale ones of earlier layers
        for key in [k for k in self.prefetched if k[0] < layer or (k[0] == layer and k[1] not in ns)]:
            self._discard_prefetch(self.prefetched.pop(key))
        counts = self.metrics.layer(layer)
        deferred: list[Key] = []
        decoding = self.decoding
        for e in needed:
            key = (layer, e)
            counts.accesses += 1
            counts.decode_accesses += decoding
            if key in self.pinned:
                counts.resident += 1
                counts.decode_served += decoding
                continue
            pf = self.prefetched.pop(key, None)
            tier = self.tiers.get(key)
            if tier is None:
                raise MoetierError(f"layer {layer} expert {e}: no such routed expert "
                                   f"(MoE layers {list(self.spec.moe_layer_ids)}, {self.spec.num_experts} experts)")
            if tier == "cache":
                acc = self.cache.access(layer, e, needed, self.pool.acquire, self._release)
                if acc.hit:
                    counts.hits += 1
                    counts.decode_served += decoding
                    self.current[key] = ("cache", None)
                    if pf is not None:
                        self._discard_prefetch(pf)
                    continue
                counts.misses += 1
                if acc.slot is not None:
                    if pf is not None:  # the prefetch slot becomes the cache slot
                        self._release(self.cache.replace_slot(key, pf.slot))
                        self.n_prefetch_used -= 1
                        self.metrics.prefetch_served += 1
                        job = pf
                    else:
                        job = self._submit(layer, e, acc.slot, prefetch=False)
                    self.current[key] = ("cache", job)
                    continue
            else:
                counts.misses += 1
            # bypass: serve once from a transient slot
            if pf is not None:
                self.n_prefetch_used -= 1
                self.n_bypass_used += 1
                self.metrics.prefetch_served += 1
                self.current[key] = ("bypass", pf)
            else:
                self.current[key] = ("bypass", None)
                deferred.append(key)
        # start bypass reads now while a transient slot is spare (keep one for later gets)
        for key in deferred:
            if self.n_bypass_used >= BYPASS_SLOTS - 1:
                break
            s = self.pool.acquire()
            if s is None:
                break
            self.n_bypass_used += 1
            self.current[key] = ("bypass", self._submit(key[0], key[1], s, prefetch=False))

    def get(self, layer: int, expert: int) -> ExpertWeights:
        key = (layer, expert)
        w = self.pinned.get(key)
        if w is not None:
            return w
        entry = self.current.get(key)
        if entry is None:
            raise MoetierError(f"layer {layer} expert {expert}: get() without require() in this step")
        kind, job = entry
        if kind == "cache":
            if job is not None:
                self._wait(job)
                self.current[key] = ("cache", None)
                if job.error is not None:
                    self.cache.mark_invalid(key)
                    raise job.error
                self.cache.mark_valid(key)
            return self._views[self.cache.slot_of[key]][self.layout.variant_of(layer)]
        # bypass
        self._free_consumed_bypass()
        if job is None:
            self._reap()
            s = self.pool.acquire()
            while s is None and self.zombies:
                self.zombies[0].done.wait()
                self._reap()
                s = self.pool.acquire()
            if s is None:  # pragma: no cover - the slot accounting guarantees a spare
                raise RuntimeError("tiered provider: no free transient slot")
            self.n_bypass_used += 1
            job = self._submit(layer, expert, s, prefetch=False)
        self._wait(job)
        self.current[key] = ("bypass", None)
        self.consumed_bypass.append(job)
        if job.error is not None:
            raise job.error
        return self._views[job.slot][self.layout.variant_of(layer)]

    # ----- prefetch -----
    def prefetch(self, layer: int, ranked: Seq[int]) -> None:
        """Guessed experts of MoE layer ``layer`` (best first): start reading the missing ones."""
        self.finish_layer()
        self.guesses[layer] = set(int(e) for e in ranked)
        if self.prefetch_slots == 0:
            return
        for e in ranked:
            key = (layer, int(e))
            if key in self.pinned or key in self.cache.valid or key in self.prefetched:
                continue
            if self.tiers.get(key) is None:
                continue
            if self.n_prefetch_used >= self.prefetch_slots:
                break
            s = self.pool.acquire()
            if s is None:
                break
            self.n_prefetch_used += 1
            self.prefetched[key] = self._submit(layer, int(e), s, prefetch=True)

    def on_step(self, tokens: int, decode: bool) -> None:
        self.finish_layer()
        for key in list(self.prefetched):  # left over from an interrupted forward
            self._discard_prefetch(self.prefetched.pop(key))
        self.guesses.clear()
        self.step += 1
        self.cache.on_step(self.step)
        m = self.metrics
        m.steps += 1
        m.tokens += tokens
        self.decoding = decode

    def close(self) -> None:
        self.finish_layer()
        for j in self.prefetched.values():
            j.cancelled = True
        self.worker.close()
        self.store.close()


# ---------------------------------------------------------------------------------------
# wiring into moetier.load


def prefetch_slot_count(plan: PlacementPlan, spec: ModelSpec, slot_bytes: int) -> int:
    """Prefetch slots: ``prefetch_max_inflight_bytes`` worth (at least 1), at most
    ``2 * top_k`` (guesses only ever target the next MoE layer; at decode that is top_k
    experts per sequence)."""
    if not plan.prefetch:
        return 0
    return int(max(1, min(plan.prefetch_max_inflight_bytes // slot_bytes, 2 * spec.top_k, spec.num_experts)))


def tiered_factory(plan: PlacementPlan, *, cache_slots: int | None = None, profile: Any = None,
                   io: str = "auto", check_finite: bool = True, io_threads: int = DEFAULT_IO_THREADS,
                   budget: Any = None, experts_held: int | None = None) -> Any:
    """An ``expert_provider_factory`` for :func:`moetier.load` building a
    :class:`TieredExpertProvider` from ``plan``.

    The number of cache slots is ``cache_slots`` if given, else the plan's ``cache_bytes``
    (or ``cache_fraction`` of the routed set) divided by the slot size, else (``max_ram``
    set) what :mod:`moetier.weights.budget` leaves after the measured resident set, else
    every expert. ``budget`` (a :class:`~moetier.weights.budget.MemoryBudget`) receives the
    final accounting. ``experts_held``: (layer, expert) pairs this process can be asked for (an
    expert-parallel rank's share; default all): no more cache slots than that.
    """

    def factory(spec: ModelSpec, reader: ExpertReader) -> TieredExpertProvider:
        from moetier.weights import budget as budget_mod

        store = ExpertStore(reader, io=io, check_finite=check_finite, readers=io_threads)
        slot = store.layout.slot_bytes
        n_experts = spec.num_moe_layers * spec.num_experts
        n_pinned = sum(1 for t in plan.expert_tiers(spec).values() if t == "resident")
        pf_slots = prefetch_slot_count(plan, spec, slot)
        n = cache_slots
        if n is None:
            cb = plan.resolved_cache_bytes(n_experts * store.layout.expert_bytes)
            if cb is not None:
                n = int(cb // slot)
            elif plan.max_ram is not None:
                n = budget_mod.cache_slots_for(spec, plan, slot_bytes=slot, n_pinned=n_pinned,
                                               prefetch_slots=pf_slots, bypass_slots=BYPASS_SLOTS, budget=budget)
            else:
                n = n_experts - n_pinned
        n = max(0, min(int(n), (experts_held or n_experts) - n_pinned))
        if plan.max_ram is not None and budget is not None:
            budget_mod.record(spec, budget, slot_bytes=slot, cache_slots=n, n_pinned=n_pinned,
                              prefetch_slots=pf_slots, bypass_slots=BYPASS_SLOTS)
        return TieredExpertProvider(spec, reader, plan, cache_slots=n, prefetch_slots=pf_slots, profile=profile,
                                    check_finite=check_finite, io_threads=io_threads, store=store)

    return factory


class _StepHook:
    def __init__(self, provider: TieredExpertProvider):
        self.provider = provider

    def __call__(self, module: Any, args: tuple[Any, ...]) -> None:
        items = args[0]
        tokens = sum(int(t.shape[0]) for _, t in items)
        self.provider.on_step(tokens, decode=tokens == len(items))


def bind(model: Any, provider: TieredExpertProvider) -> None:
    """Install the step counter (and prefetch hooks if the plan says so) on a loaded model;
    expose ``model.hierarchy_metrics`` and ``model.hierarchy``."""
    net = model.net
    handles = [net.register_forward_pre_hook(_StepHook(provider))]
    pre = None
    if provider.plan.prefetch:
        pre = RouterPrefetcher(net, provider.prefetch)
    provider.metrics.always_on_bytes_per_token = int(net.dense_bytes_per_token())
    provider._hook_handles = handles  # type: ignore[attr-defined]
    provider._prefetcher = pre  # type: ignore[attr-defined]
    model.hierarchy = provider
    model.hierarchy_metrics = provider.metrics


def routing_profile_for(model_dir: Any, spec: ModelSpec) -> np.ndarray | None:
    """The checkpoint's ``routing_profile.json`` (if any) as ``[moe_layers, experts]`` selection
    probabilities, read by the planner's one profile loader."""
    from pathlib import Path

    from moetier.planner.roofline import load_profile

    p = Path(model_dir) / "routing_profile.json"
    return load_profile(p, spec) if p.is_file() else None


def native_copy_bytes(d: Any, spec: ModelSpec, itemsize: int, load_kwargs: dict[str, Any]) -> int:
    """RAM the native decoder will add after loading, for the budget (``MemoryBudget.native_bytes``):
    the plain model-dtype copy of every MLA ``kv_b_proj`` stored quantized -- in the checkpoint
    (FP8 releases, an older GGUF's one block-type ``attn_kv_b``; not a GGUF's ``attn_k_b`` /
    ``attn_v_b`` pair, read as stored: ``layers/mla.py: SplitKVB``) or at load (``quantize_all``)
    -- see ``native/mla.py: plain_kv_b``. Read from the tensor headers, before any weight is loaded; 0 when the native
    path is off or the model is not MLA."""
    from moetier import native
    from moetier.native.mla import plain_copy_bytes

    if spec.attention != "mla" or load_kwargs.get("native") is False or not native.enabled():
        return 0
    names = [f"model.layers.{i}.self_attn.kv_b_proj.weight" for i in range(spec.num_layers)]
    if load_kwargs.get("quantize_all"):  # every plain kv_b_proj is quantized at load (quant/atload.py)
        import torch

        from moetier.quant.convert import quantizable

        shape = (spec.num_heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
        if quantizable(names[0], torch.empty(shape, device="meta"), experts_only=False):
            return plain_copy_bytes(spec, itemsize)
    if d.suffix == ".gguf":
        from moetier.weights.gguf_io import GGUFIndex

        gi = GGUFIndex(d)
        try:
            n = sum(1 for x in names if x in gi.tensors and gi.is_quantized(x))
        finally:
            gi.close()
    elif spec.quantization is not None:
        from moetier.weights.safetensors_io import SafetensorsIndex

        si = SafetensorsIndex(d, quant=spec.quantization)
        try:
            n = sum(1 for x in names if x in si.quantized)
        finally:
            si.close()
    else:
        n = 0
    return plain_copy_bytes(spec, itemsize, n)


def hierarchy_options_given(opts: dict[str, Any]) -> bool:
    return any(opts.get(k) is not None for k in ("max_ram", "policy", "expert_cache", "cache_scope", "prefetch",
                                                  "plan"))


def load(path: Any = None, *, plan: Any = None, max_ram: Any = None, policy: str | None = None,
         policy_params: dict[str, Any] | None = None, expert_cache: Any = None, cache_scope: str | None = None,
         prefetch: bool | None = None, prefetch_max_inflight_bytes: Any = None, profile: Any = None,
         context: int | None = None, batch: int = 1, io: str = "auto", io_threads: int = DEFAULT_IO_THREADS,
         cache_slots: int | None = None, wrap: Any = None, experts_held: int | None = None,
         request_bytes: int = 0, **load_kwargs: Any) -> Any:
    """``moetier.load`` with the weight hierarchy: routed experts behind a
    :class:`TieredExpertProvider` sized by ``plan`` / ``max_ram`` / ``expert_cache``.

    ``wrap(provider) -> provider`` puts the tiered provider behind another (expert parallelism:
    ``moetier.distributed``), which keeps it as ``.local``; ``experts_held`` caps the cache slots.

    ``plan`` may be a :class:`PlacementPlan` or a plan file path; the other options override
    its fields. A ``max_ram`` below the always-on set plus the minimum working set is refused
    (BudgetError) before any weight is read. The returned model has ``hierarchy`` (the
    provider), ``hierarchy_metrics`` and ``memory_budget``. ``request_bytes``: memory a server
    reserves for its requests (``moetier serve``; :mod:`moetier.serve.memory`), inside ``max_ram``.
    """
    from pathlib import Path

    import moetier.runtime as runtime
    from moetier.planner.census import census
    from moetier.spec import load_spec
    from moetier.weights import budget as budget_mod
    from moetier.weights.plan import default_plan, load_plan

    if max_ram is not None or (plan is not None and not isinstance(plan, (str, Path)) and plan.max_ram):
        budget_mod.limit_malloc_arenas()
    baseline = budget_mod.rss_bytes()
    d = Path(path) if path is not None else runtime.EMBEDDED_DIR
    spec = load_spec(d)
    base = load_plan(plan, spec) if isinstance(plan, (str, Path)) else plan
    dtype = runtime.resolve_dtype(load_kwargs.get("dtype", "auto"), spec)
    itemsize = 2 if dtype != runtime.torch.float32 else 4
    prec = "fp32" if itemsize == 4 else "bf16"
    if spec.quantization is not None:  # quantized groups at their stored bytes
        from moetier.weights.stored import checkpoint_precision

        prec = checkpoint_precision(d, spec, plain=prec)
    elif load_kwargs.get("quantize"):  # quantized at load (moetier.quant.atload)
        from moetier.quant.atload import census_groups, check

        qfmt = load_kwargs["quantize"]
        g = check(qfmt, load_kwargs.get("quantize_group"))
        groups = census_groups(qfmt, g, bool(load_kwargs.get("quantize_all")),
                               bool(load_kwargs.get("quantize_keep_head")), spec.hidden_size)
        prec = f"mixed:{groups},default={prec}"
    cen = census(spec, prec)
    if d.suffix == ".gguf":  # stored block types: the bytes the runtime will actually hold
        from moetier.weights.gguf_io import stored_census

        cen = stored_census(d, cen, dtype)
    pl = default_plan(spec, cen, max_ram, base=base, policy=policy, policy_params=policy_params,
                      expert_cache=expert_cache, cache_scope=cache_scope, prefetch=prefetch,
                      prefetch_max_inflight_bytes=prefetch_max_inflight_bytes)
    context = runtime.check_context(context, spec)
    mb = None
    if pl.max_ram is not None:
        mb = budget_mod.MemoryBudget(max_ram=pl.max_ram, context=context, batch=batch, itemsize=itemsize,
                                     baseline_rss=baseline, loading_bytes=budget_mod.loading_bytes(d),
                                     request_bytes=int(request_bytes),
                                     native_bytes=native_copy_bytes(d, spec, itemsize, load_kwargs))
        slot = -(-int(cen.expert_bytes) // 4096) * 4096
        pf = prefetch_slot_count(pl, spec, slot)
        n_experts = spec.num_moe_layers * spec.num_experts
        n_pinned = sum(1 for t in pl.expert_tiers(spec).values() if t == "resident")
        asked = cache_slots
        if asked is None:
            cb = pl.resolved_cache_bytes(n_experts * cen.expert_bytes)
            asked = None if cb is None else int(cb // slot)
        if asked is not None:
            asked = max(0, min(int(asked), n_experts - n_pinned))
        opt = expert_cache if expert_cache is not None else (None if asked is None else f"{asked} slots")
        budget_mod.check_upfront(spec, mb, always_on_bytes=cen.always_on_bytes, slot_bytes=slot,
                                 transient_slots=pf + BYPASS_SLOTS, pinned_slots=n_pinned, cache_slots=asked,
                                 prefetch_slots=pf, cache_option=None if opt is None else str(opt))
    if profile is None and pl.policy == "static" and "profile" not in pl.policy_params:
        profile = routing_profile_for(d, spec)
    elif isinstance(profile, (str, Path)):
        from moetier.planner.roofline import load_profile

        profile = load_profile(profile, spec)
    factory = tiered_factory(pl, cache_slots=cache_slots, profile=profile, io=io, io_threads=io_threads,
                             check_finite=load_kwargs.get("check_finite", True), budget=mb,
                             experts_held=experts_held)
    outer = factory if wrap is None else (lambda spec, reader: wrap(factory(spec, reader)))
    model = runtime.load(path, expert_provider_factory=outer, context=context, **load_kwargs)
    inner = model.provider if wrap is None else model.provider.local
    if isinstance(inner, TieredExpertProvider):
        bind(model, inner)
    model.memory_budget = mb
    model.placement_plan = pl
    model.placement_precision = prec  # the census precision of the bytes held (stored formats)
    return model


# ---------------------------------------------------------------------------------------
# command-line options (moetier run / chat) and the run report


def add_arguments(p: Any) -> None:
    """``--max-ram``, ``--policy``, ``--expert-cache``, ``--cache-scope``, ``--prefetch``, ``--plan``..."""
    from moetier.weights.policies import POLICIES

    g = p.add_argument_group("weight hierarchy (any of these serves routed experts from a cache over the files)")
    g.add_argument("--max-ram", default=None, metavar="SIZE",
                   help="hard RAM budget: process + always-on weights + expert cache + KV cache + activations "
                   "(e.g. 3G); too small a budget is refused before loading, naming the smallest that works")
    g.add_argument("--policy", default=None, choices=[n for n in POLICIES if n != "belady"],
                   help="expert-cache policy (default: adaptive with --max-ram, else lru)")
    g.add_argument("--expert-cache", default=None, metavar="SIZE",
                   help="expert-cache size: a size (1.5G), a fraction (0.25) or a percentage (25%%) of the "
                   "routed experts (default: what --max-ram leaves, else all)")
    g.add_argument("--cache-scope", default=None, choices=["global", "per_layer"],
                   help="one expert cache shared by all layers (global, the default) or an equal share per "
                   "layer (per_layer)")
    g.add_argument("--prefetch", dest="prefetch", action="store_true", default=None,
                   help="guess the next layer's experts with its router and read them in the background")
    g.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="read experts only when a layer asks for them (default with --max-ram: prefetch on)")
    g.add_argument("--plan", default=None, help="placement plan file (.yaml/.json); options above override it")
    g.add_argument("--profile", default=None,
                   help="routing profile for --policy static (default: the model's routing_profile.json)")
    g.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="longest sequence (prompt + completion) in tokens; longer prompts are refused; with "
                   "--max-ram the budget reserves KV cache for it (default: the model's context window)")
    g.add_argument("--io", default=None, choices=["buffered", "direct", "auto"],
                   help="store reads: buffered pread (+ drop from page cache) or O_DIRECT")


def load_kwargs(args: Any) -> dict[str, Any]:
    """The hierarchy options of parsed ``args`` for ``moetier.load`` (empty if none given)."""
    keys = ("max_ram", "policy", "expert_cache", "cache_scope", "prefetch", "plan", "profile", "io")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "context", None) is not None:  # not a hierarchy option by itself
        out["context"] = args.context
    return out


def run_report(model: Any, decode_tokens_per_s: float | None) -> dict[str, Any]:
    """Hierarchy figures for ``moetier run --json``: hit rate, bytes per token per tier,
    stall time, prefetch precision/recall, and the planner's decode prediction for the same
    model, machine (the probed ``cpu``) and cache size, with measured/predicted."""
    m = getattr(model, "hierarchy_metrics", None)
    if m is None:
        return {}
    prov = model.hierarchy
    s = m.summary()
    out: dict[str, Any] = {
        "hit_rate": s["hit_rate"],
        "cache_hit_rate": s["cache_hit_rate"],
        "hit_rate_per_layer": s["hit_rate_per_layer"],
        "bytes_per_token": s["bytes_per_token"],
        "stall_seconds": s["stall_seconds"],
        "prefetch_precision": s["prefetch_precision"],
        "prefetch_recall": s["prefetch_recall"],
        "hierarchy": {**prov.describe(), **{k: v for k, v in s.items() if k not in ("hit_rate_per_layer",)}},
        "placement_plan": getattr(model, "placement_plan", prov.plan).to_json(),
        "memory_budget": model.memory_budget.to_json() if getattr(model, "memory_budget", None) else None,
        "predicted_decode_tokens_per_s": None,
    }
    try:
        from moetier.planner import probe
        from moetier.planner.roofline import predict_decode_tokens_per_s

        rec = probe.load_cached()
        if rec is None:
            out["prediction_note"] = "run `moetier probe` once to measure this machine for the planner"
            return out
        out["probe"] = probe.describe(rec)
        hr = s["hit_rate"] if s["hit_rate"] is not None else 1.0
        prec = getattr(model, "placement_precision", None) or ("fp32" if model.dtype.itemsize == 4 else "bf16")
        # the cached probe as it is (a run does not stop to re-measure; "probe" says how old it is)
        pred = predict_decode_tokens_per_s(model.spec, probe.machine_from_probe(rec), hit_rate=hr,
                                           cache_bytes=prov.cache_bytes + prov.pinned_bytes, precision=prec)
        out["predicted_decode_tokens_per_s"] = pred
        if decode_tokens_per_s and pred:
            out["measured_over_predicted"] = decode_tokens_per_s / pred
    except MoetierError as e:
        out["prediction_note"] = str(e)
    return out
