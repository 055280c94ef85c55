"""Expert-cache replacement policies: pure objects shared by the runtime and the simulator.

A policy object *is* the bookkeeping of one cache of ``capacity`` slots. It holds no
weights and does no I/O: it only decides which keys are resident. Keys are any hashable
value; moetier uses the expert id (``int``) for a per-layer cache and ``(layer, expert)``
for a cache shared by all layers. The same classes are used by the tiered runtime cache
(``weights/``) and by the trace simulator (``traces/simulate.py``); the simulator never
re-implements a policy.

How the runtime calls a policy
------------------------------
moetier's expert cache is **one policy object per MoE layer** (keys = expert ids), which
is what the simulator and the reference figures in ``docs/traces.md`` measure. A global
cache (keys = ``(layer, expert)``) works with the same classes.

For each step, after the router picked the experts of the flat token batch of layer
``l``, the runtime calls, for every *unique* expert ``e`` it needs, in router order::

    hit = policy.access(e, exclude=needed_now)   # needed_now: set of this step's experts
    if not hit:
        if policy.evicted is not None:            # a victim was chosen: free its slot
            cache.drop(policy.evicted)
        weights = store.read(e)                   # the miss is always served
        if policy.admitted:                       # keep it, it now owns a slot
            cache.put(e, weights)
        # else: use `weights` for this step only (bypass), do not cache them

``access`` runs the hooks in a fixed order, which is the whole contract:

1. resident key -> ``on_hit(key)``; returns ``True``.
2. otherwise ``on_miss(key)`` (frequency bookkeeping of non-resident keys).
3. if the cache is full, ``victim(exclude)`` proposes a resident key not in ``exclude``;
   if every resident key is excluded there is no victim and the key is bypassed.
4. ``admit(key, victim)`` (victim None while a slot is free); a refused key is bypassed:
   not cached (``admitted = False``), nothing evicted.
5. the victim (if any) is removed and ``on_evict(victim)`` is called (``evicted`` holds
   it); the key becomes resident and ``on_insert(key)`` is called; returns ``False``.

Passing ``exclude`` (the experts of the current step) stops a policy from evicting an
expert that the same step still needs; the trace simulator replays each top-k selection
as one access without ``exclude``, exactly like the reference figures. Optionally the
runtime calls ``policy.on_step(step)`` once per decode step (a clock; only policies that
age by steps use it). Policies are not thread-safe: one owner calls them.

Policies
--------
``lru``
    least recently used.
``lfu``
    least frequently used; counts persist after eviction (a key's count is all its
    accesses so far), ties are broken in the iteration order of the resident set (CPython
    set order). This is the variant that reproduces the reference LFU figures exactly.
``lfu-decay``
    LFU whose counts (resident or not) are multiplied by ``decay`` (0.5) every ``period``
    (1024) accesses of this cache (aging).
``static``
    pins the ``capacity`` hottest keys of a recorded routing profile (per-expert counts,
    1-D for a per-layer cache or ``[layers, experts]`` for a global one); nothing else is
    ever admitted. Resident from the start.
``adaptive``
    recency-weighted frequency (LRFU-style) with frequency-based admission: each key's
    score is the sum of ``2 ** (-age / half_life)`` over its past accesses (``age`` in
    accesses of this cache), kept for evicted keys too. The victim is the resident key
    with the lowest score, and a missed key only replaces it if its own score (this access
    included) is higher (TinyLFU-style admission; otherwise it is served uncached). The
    half-life moves it between LFU (long) and LRU (short). ``half_life=160`` accesses and
    admission on is the one setting used on every trace; on the provided traces it is at
    least as good as the better of LRU and LFU at 25% and 50% caches (docs/traces.md; it
    is not on every half of those files, where LFU can be better).
``belady``
    offline optimum (evicts the key whose next use is farthest away). It needs the future
    access sequence, so only the simulator can build it (``future=`` or ``next_use=``).

``get_policy(name, capacity=..., **params)`` builds any of them by name.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from moetier.errors import MoetierError

Key = Hashable

_NO_EXCLUDE: frozenset = frozenset()


class PolicyError(MoetierError):
    """A bad policy name or parameter."""


def _check_capacity(capacity: Any) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise PolicyError(f"cache capacity: expected an integer >= 0 (slots), got {capacity!r}")
    return int(capacity)


class CachePolicy:
    """Base class: resident-set bookkeeping plus the hook order documented in the module.

    Subclasses override the hooks; ``access`` is the only driver and is never overridden,
    so the runtime and the simulator run exactly the same code.
    """

    name = "base"

    def __init__(self, capacity: int) -> None:
        self.capacity = _check_capacity(capacity)
        self._resident: set[Key] = set()
        self.evicted: Key | None = None  # key evicted by the last access (None: none)
        self.admitted: bool = False  # whether the last missed key was cached

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: Key) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def resident(self) -> frozenset:
        """A snapshot of the resident keys."""
        return frozenset(self._resident)

    # ------------------------------------------------------------------ hooks
    def on_hit(self, key: Key) -> None:
        """A resident key was accessed."""

    def on_miss(self, key: Key) -> None:
        """A non-resident key was accessed (before admit / insert)."""

    def admit(self, key: Key, victim: Key | None) -> bool:
        """Whether a missed key may take a slot (False: bypass, serve it uncached).

        ``victim`` is the key it would replace (None while the cache has a free slot).
        """
        return True

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:
        """The resident key to evict, never one in ``exclude``; None if there is none."""
        raise NotImplementedError

    def on_insert(self, key: Key) -> None:
        """A key became resident."""

    def on_evict(self, key: Key) -> None:
        """A key stopped being resident."""

    def on_step(self, step: int) -> None:
        """Optional clock: the runtime calls it once per decode step."""

    # ------------------------------------------------------------------ driver
    def access(self, key: Key, exclude: Iterable[Key] = _NO_EXCLUDE) -> bool:
        """One access to ``key``: True on a hit; on a miss see ``evicted`` / ``admitted``."""
        self.evicted = None
        if key in self._resident:
            self.on_hit(key)
            return True
        self.on_miss(key)
        if self.capacity == 0:
            self.admitted = False
            return False
        v = None
        if len(self._resident) >= self.capacity:
            v = self.victim(exclude)
            if v is None:
                self.admitted = False
                return False
        if not self.admit(key, v):
            self.admitted = False
            return False
        if v is not None:
            self._resident.discard(v)
            self.on_evict(v)
            self.evicted = v
        self._resident.add(key)
        self.on_insert(key)
        self.admitted = True
        return False

    def describe(self) -> dict[str, Any]:
        """Name and parameters (for reports)."""
        return {"name": self.name, "capacity": self.capacity}


def _min_by(resident: set, score: Callable[[Key], Any], exclude: Iterable[Key]) -> Key | None:
    """Resident key with the lowest score; ties: first in the resident set's order."""
    if not exclude:
        return min(resident, key=score) if resident else None
    ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    cands = [k for k in resident if k not in ex]
    return min(cands, key=score) if cands else None


class LRU(CachePolicy):
    """Least recently used."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self._order[key] = None

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:
        if not exclude:
            return next(iter(self._order), None)
        ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        for k in self._order:
            if k not in ex:
                return k
        return None


class LFU(CachePolicy):
    """Least frequently used; counts persist after eviction; ties in resident-set order."""

    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.counts: dict[Key, float] = {}

    def _count(self, key: Key) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    on_hit = _count
    on_miss = _count

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:
        return _min_by(self._resident, self.counts.__getitem__, exclude)


class LFUDecay(LFU):
    """LFU with aging: every ``period`` accesses all counts are multiplied by ``decay``."""

    name = "lfu-decay"

    def __init__(self, capacity: int, period: int = 1024, decay: float = 0.5) -> None:
        super().__init__(capacity)
        if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
            raise PolicyError(f"lfu-decay parameter period: expected an integer >= 1 (accesses), got {period!r}")
        if not (isinstance(decay, (int, float)) and 0.0 < decay <= 1.0):
            raise PolicyError(f"lfu-decay parameter decay: expected a number in (0, 1], got {decay!r}")
        self.period = int(period)
        self.decay = float(decay)
        self._n = 0

    def _count(self, key: Key) -> None:
        self._n += 1
        if self._n >= self.period:
            self._n = 0
            d = self.decay
            self.counts = {k: v * d for k, v in self.counts.items()}
        self.counts[key] = self.counts.get(key, 0.0) + 1.0

    on_hit = _count
    on_miss = _count

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "period": self.period, "decay": self.decay}


class Adaptive(CachePolicy):
    """Recency-weighted frequency (LRFU-style) with a half-life in accesses, plus admission.

    Scores are stored multiplied by ``2 ** (t / half_life)`` (``t`` = access counter) so an
    access only touches one key; they are rescaled before they overflow.
    """

    name = "adaptive"

    def __init__(self, capacity: int, half_life: float = 160.0, admission: bool = True) -> None:
        super().__init__(capacity)
        if not (isinstance(half_life, (int, float)) and not isinstance(half_life, bool) and half_life > 0):
            raise PolicyError(f"adaptive parameter half_life: expected a number > 0 (accesses), got {half_life!r}")
        if not isinstance(admission, (bool, int)):
            raise PolicyError(f"adaptive parameter admission: expected true/false, got {admission!r}")
        self.half_life = float(half_life)
        self.admission = bool(admission)
        self._growth = 2.0 ** (1.0 / self.half_life)
        self._inc = 1.0
        self.scores: dict[Key, float] = {}

    def _count(self, key: Key) -> None:
        inc = self._inc * self._growth
        if inc > 1e250:
            self.scores = {k: v / inc for k, v in self.scores.items()}
            inc = 1.0
        self._inc = inc
        self.scores[key] = self.scores.get(key, 0.0) + inc

    on_hit = _count
    on_miss = _count

    def admit(self, key: Key, victim: Key | None) -> bool:
        if victim is None or not self.admission:
            return True
        return self.scores[key] > self.scores[victim]

    def score(self, key: Key) -> float:
        """Current score of ``key`` (decayed access count; 0 if never seen)."""
        return self.scores.get(key, 0.0) / self._inc

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:
        return _min_by(self._resident, self.scores.__getitem__, exclude)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "half_life": self.half_life, "admission": self.admission}


class Static(CachePolicy):
    """Pins the ``capacity`` hottest keys of a routing profile; admits nothing else."""

    name = "static"

    def __init__(self, capacity: int, profile: Any = None) -> None:
        super().__init__(capacity)
        if profile is None:
            raise PolicyError(
                "static policy needs profile=: per-expert counts (1-D array or {key: count}) "
                "or a [layers, experts] array"
            )
        items = _profile_items(profile)
        # hottest first; ties: smaller key first (stable, deterministic)
        ranked = sorted(items, key=lambda kv: -kv[1])
        self.pinned: tuple[Key, ...] = tuple(k for k, c in ranked[: self.capacity])
        for k in self.pinned:
            self._resident.add(k)

    def admit(self, key: Key, victim: Key | None) -> bool:
        return False

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:  # pragma: no cover
        return None


def _profile_items(profile: Any) -> list[tuple[Key, float]]:
    if isinstance(profile, Mapping):
        items = [(k, float(v)) for k, v in profile.items()]
    else:
        arr = np.asarray(profile, dtype=np.float64)
        if arr.ndim == 1:
            items = [(int(i), float(c)) for i, c in enumerate(arr)]
        elif arr.ndim == 2:
            items = [((int(layer), int(e)), float(arr[layer, e])) for layer in range(arr.shape[0])
                     for e in range(arr.shape[1])]
        else:
            raise PolicyError(f"static parameter profile: expected 1-D or 2-D counts, got shape {arr.shape}")
    for k, c in items:
        if not math.isfinite(c) or c < 0:
            raise PolicyError(f"static parameter profile: count of {k!r} is {c}; expected a finite number >= 0")
    return items


class Belady(CachePolicy):
    """Offline optimum: evict the resident key whose next access is farthest in the future.

    Build it with the whole access sequence (``future``) or with ``next_use`` (for access
    ``i``, the index of the next access of the same key, or a large number). Accesses must
    then arrive in exactly that order.
    """

    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Key] | None = None,
                 next_use: Sequence[int] | np.ndarray | None = None) -> None:
        super().__init__(capacity)
        if next_use is None:
            if future is None:
                raise PolicyError("belady policy needs the future access sequence (future= or next_use=); "
                                  "only the simulator can build it")
            next_use = next_use_indices(future)
        self._next = next_use.tolist() if isinstance(next_use, np.ndarray) else list(next_use)
        self._future = None if future is None else list(future)
        self._i = -1
        self._when: dict[Key, int] = {}

    def _advance(self, key: Key) -> int:
        i = self._i + 1
        self._i = i
        if i >= len(self._next):
            raise PolicyError(f"belady: access {i} is past the end of the known future ({len(self._next)} accesses)")
        if self._future is not None and self._future[i] != key:
            raise PolicyError(f"belady: access {i} is {key!r} but the future says {self._future[i]!r}")
        return i

    def on_hit(self, key: Key) -> None:
        self._when[key] = self._next[self._advance(key)]

    def on_miss(self, key: Key) -> None:
        self._advance(key)

    def on_insert(self, key: Key) -> None:
        self._when[key] = self._next[self._i]

    def on_evict(self, key: Key) -> None:
        del self._when[key]

    def victim(self, exclude: Iterable[Key] = _NO_EXCLUDE) -> Key | None:
        w = self._when
        if not exclude:
            return max(self._resident, key=w.__getitem__) if self._resident else None
        return _min_by(self._resident, lambda k: -w[k], exclude)


def next_use_indices(seq: Sequence[Key] | np.ndarray) -> np.ndarray:
    """For each position, the next position with the same key (``len(seq)`` + position if none).

    Never-used-again keys get distinct large values (later accesses farther), so the
    farthest-next-use choice is well defined.
    """
    arr = np.asarray(seq) if not isinstance(seq, np.ndarray) else seq
    n = len(arr)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        order = np.argsort(arr, kind="stable")
        sorted_keys = arr[order]
        nxt = np.empty(n, dtype=np.int64)
        same = sorted_keys[1:] == sorted_keys[:-1]
        nxt[:-1] = np.where(same, order[1:], -1)
        nxt[-1] = -1
        out[order] = nxt
        never = out < 0
        out[never] = n + np.nonzero(never)[0]
        return out
    last: dict[Key, int] = {}
    items = list(seq)
    for i in range(n - 1, -1, -1):
        out[i] = last.get(items[i], n + i)
        last[items[i]] = i
    return out


POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "lfu-decay": LFUDecay,
    "static": Static,
    "adaptive": Adaptive,
    "belady": Belady,
}


def policy_names() -> list[str]:
    return list(POLICIES)


def get_policy(name: str, capacity: int, **params: Any) -> CachePolicy:
    """Build a policy by name: ``lru, lfu, lfu-decay, static, adaptive, belady``."""
    cls = POLICIES.get(str(name).lower())
    if cls is None:
        raise PolicyError(f"unknown cache policy {name!r}; valid policies: {', '.join(POLICIES)}")
    try:
        return cls(capacity, **params)
    except TypeError as e:
        raise PolicyError(f"policy {name!r}: bad parameters {sorted(params)} ({e})") from None
