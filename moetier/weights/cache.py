"""The ``cache`` tier: a fixed pool of expert slots filled and evicted by a policy.

* :class:`SlotPool` preallocates every slot once (one 4096-aligned host buffer); slots are
  handed out and returned by index, never allocated during decoding.
* :class:`ExpertCache` owns the policy objects of :mod:`moetier.weights.policies` (one per
  MoE layer, or one global one keyed by ``(layer, expert)``) and the map key -> slot. It
  calls the policies exactly as their module docstring prescribes (``access`` with the
  step's experts excluded; ``evicted`` / ``admitted`` afterwards) and does no I/O: the
  provider (:mod:`moetier.weights.tiered`) reads into the slots.

A slot is *assigned* to a key when the policy admits it and *valid* only once its read
succeeded; a failed read leaves the slot assigned but invalid, so the next access reads it
again instead of serving half-read bytes.

A device tier would be another :class:`SlotPool` (on the device) under the same
:class:`ExpertCache`: the policy code does not change.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moetier.errors import ConfigError
from moetier.weights.policies import CachePolicy, get_policy
from moetier.weights.store import ALIGN

Key = tuple[int, int]  # (layer, expert)


class SlotPool:
    """``n`` preallocated slots of ``slot_bytes`` each, in one aligned buffer."""

    def __init__(self, n: int, slot_bytes: int, device: str = "cpu"):
        if device != "cpu":
            raise ConfigError(f"slot pool device {device!r}: only 'cpu' is implemented")
        if slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a multiple of {ALIGN}")
        self.n, self.slot_bytes, self.device = int(n), int(slot_bytes), device
        raw = torch.empty(self.n * self.slot_bytes + ALIGN, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % ALIGN
        self._raw = raw
        self.buffer = raw[shift : shift + self.n * self.slot_bytes]
        self._free = list(range(self.n - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return self.n * self.slot_bytes

    def touch(self) -> None:
        """Write every page once (so the pool is resident, not lazily faulted in)."""
        self.buffer.zero_()

    def slot(self, i: int) -> torch.Tensor:
        return self.buffer[i * self.slot_bytes : (i + 1) * self.slot_bytes]

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, i: int) -> None:
        self._free.append(i)

    @property
    def free(self) -> int:
        return len(self._free)


@dataclass
class Access:
    """Outcome of one cache access."""

    hit: bool  # the key was resident in the policy AND its slot holds valid weights
    slot: int | None  # slot assigned to the key (None: not cached -> bypass)
    evicted: Key | None
    needs_read: bool  # slot assigned but not valid yet (miss or earlier failed read)


class ExpertCache:
    """Policy-driven mapping of routed experts to slots of a :class:`SlotPool`.

    ``capacity`` slots in total: ``global`` scope = one policy over ``(layer, expert)``
    keys; ``per_layer`` = ``capacity // len(layers)`` slots per MoE layer, one policy each
    (keys = expert ids). Main-thread only (policies are not thread-safe).
    """

    def __init__(self, layers: Sequence[int], capacity: int, policy: str = "lru",
                 policy_params: Mapping[str, Any] | None = None, scope: str = "global",
                 profile: Any = None):
        self.layers = tuple(layers)
        self.scope = scope
        params = dict(policy_params or {})
        self.policy_name = policy
        if scope == "global":
            if policy == "static":
                params.setdefault("profile", _global_profile(profile, self.layers))
            self.policies: dict[int | None, CachePolicy] = {None: get_policy(policy, capacity, **params)}
            self.capacity = capacity
        elif scope == "per_layer":
            per = capacity // max(1, len(self.layers))
            self.policies = {}
            for layer in self.layers:
                p = dict(params)
                if policy == "static":
                    p.setdefault("profile", _layer_profile(profile, layer, self.layers))
                self.policies[layer] = get_policy(policy, per, **p)
            self.capacity = per * len(self.layers)
        else:
            raise ConfigError(f"cache scope {scope!r}: expected global or per_layer")
        self.slot_of: dict[Key, int] = {}
        self.valid: set[Key] = set()

    def _policy(self, layer: int) -> tuple[CachePolicy, bool]:
        if self.scope == "global":
            return self.policies[None], True
        return self.policies[layer], False

    def resident_keys(self) -> list[Key]:
        """Keys the policies hold resident now (e.g. a static policy's pinned set)."""
        out: list[Key] = []
        for layer, pol in self.policies.items():
            for k in pol.resident():
                out.append(k if layer is None else (layer, k))
        return out

    def on_step(self, step: int) -> None:
        for p in self.policies.values():
            p.on_step(step)

    def access(self, layer: int, expert: int, needed: Iterable[int], acquire: Any, release: Any) -> Access:
        """One access (policy order as documented in policies.py).

        ``acquire() -> slot`` and ``release(slot)`` manage free slots for admitted keys and
        evicted victims.
        """
        pol, glob = self._policy(layer)
        pkey: Hashable = (layer, expert) if glob else expert
        exclude = {(layer, e) for e in needed} if glob else set(needed)
        key = (layer, expert)
        hit = pol.access(pkey, exclude=exclude)
        evicted: Key | None = None
        if not hit and pol.evicted is not None:
            v = pol.evicted
            evicted = v if glob else (layer, v)
            s = self.slot_of.pop(evicted, None)
            self.valid.discard(evicted)
            if s is not None:
                release(s)
        if hit or pol.admitted:
            s = self.slot_of.get(key)
            if s is None:
                s = acquire()
                self.slot_of[key] = s
            valid = key in self.valid
            return Access(hit and valid, s, evicted, not valid)
        return Access(False, None, evicted, False)

    def mark_valid(self, key: Key) -> None:
        if key in self.slot_of:
            self.valid.add(key)

    def mark_invalid(self, key: Key) -> None:
        self.valid.discard(key)

    def replace_slot(self, key: Key, new_slot: int) -> int:
        """Give ``key`` the (already filled) ``new_slot``; returns its previous slot."""
        old = self.slot_of[key]
        self.slot_of[key] = new_slot
        return old

    def describe(self) -> dict[str, Any]:
        p = next(iter(self.policies.values()))
        return {"policy": p.describe(), "scope": self.scope, "capacity_slots": self.capacity}


def _global_profile(profile: Any, layers: Sequence[int]) -> dict[Key, float]:
    if profile is None:
        return None  # let the policy raise its own clear error
    if isinstance(profile, Mapping):
        out: dict[Key, float] = {}
        for k, v in profile.items():
            if isinstance(k, tuple):
                out[k] = float(v)
            else:  # {layer: counts}
                for e, c in enumerate(np.asarray(v, dtype=np.float64)):
                    out[(int(k), e)] = float(c)
        return out
    arr = np.asarray(profile, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"static policy profile: expected [layers, experts] counts, got shape {arr.shape}")
    rows = list(layers) if arr.shape[0] == len(layers) else list(range(arr.shape[0]))
    return {(layer, e): float(arr[r, e]) for r, layer in enumerate(rows) for e in range(arr.shape[1])}


def _layer_profile(profile: Any, layer: int, layers: Sequence[int]) -> Any:
    g = _global_profile(profile, layers)
    if g is None:
        return None
    return {e: c for (lay, e), c in g.items() if lay == layer}
