"""Replay a routing trace through the expert-cache policies of :mod:`moetier.weights.policies`.

The cache model is the runtime's: **one cache of ``capacity`` experts per MoE layer**. Each
of the top-k selections of each row is one access, in row order and router order within a
row (no protection of the row's other experts), which is how the reference figures of
/work/shared/data/routing-traces/README.md count. Belady (offline optimum) is built from the
layer's future access sequence and replayed through the same ``access`` path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moetier.errors import MoetierError
from moetier.traces.format import Trace
from moetier.weights.policies import CachePolicy, get_policy, next_use_indices, policy_names


@dataclass(frozen=True)
class LayerResult:
    layer: int
    accesses: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


@dataclass(frozen=True)
class SimResult:
    policy: str
    capacity: int
    params: dict[str, Any]
    per_layer: list[LayerResult] = field(default_factory=list)

    @property
    def accesses(self) -> int:
        return sum(r.accesses for r in self.per_layer)

    @property
    def hits(self) -> int:
        return sum(r.hits for r in self.per_layer)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "params": {k: v for k, v in self.params.items() if k != "profile"},
            "accesses": self.accesses,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "per_layer": [{**asdict(r), "hit_rate": r.hit_rate} for r in self.per_layer],
        }


def layer_sequences(trace: Trace) -> dict[int, np.ndarray]:
    """Per layer, the flat access sequence (rows in order, router order within a row)."""
    out: dict[int, np.ndarray] = {}
    for lyr in trace.layers:
        ids = trace.topk_ids[trace.layer == lyr]
        flat = ids.reshape(-1)
        out[lyr] = flat[flat >= 0]
    return out


def layer_counts(trace: Trace) -> dict[int, np.ndarray]:
    """Per layer, how many times each expert was selected (length ``trace.num_experts``)."""
    n = trace.num_experts
    return {lyr: np.bincount(seq, minlength=n) for lyr, seq in layer_sequences(trace).items()}


def replay(policy: CachePolicy, seq: Sequence[int] | np.ndarray) -> int:
    """Feed ``seq`` to ``policy.access`` in order; the number of hits."""
    keys = seq.tolist() if isinstance(seq, np.ndarray) else list(seq)
    return sum(map(policy.access, keys))


def build_policy(name: str, capacity: int, seq: np.ndarray, *, profile: np.ndarray | None = None,
                 **params: Any) -> CachePolicy:
    """A policy for one layer's cache; belady gets ``seq`` as its future, static a profile."""
    name = str(name).lower()
    if name == "belady":
        return get_policy(name, capacity, next_use=next_use_indices(seq), **params)
    if name == "static":
        if profile is None:
            raise MoetierError("static policy: no routing profile for this layer")
        return get_policy(name, capacity, profile=profile, **params)
    return get_policy(name, capacity, **params)


def simulate(
    trace: Trace,
    policy: str,
    capacity: int,
    *,
    profile: Trace | Mapping[int, Any] | None = None,
    layers: Sequence[int] | None = None,
    **params: Any,
) -> SimResult:
    """Replay ``trace`` with per-layer caches of ``capacity`` experts under ``policy``.

    ``profile`` (static policy only): a Trace or ``{layer: per-expert counts}``; default is
    the trace itself (an in-sample, i.e. optimistic, profile).
    """
    if str(policy).lower() not in policy_names():
        get_policy(policy, 0)  # raises the error listing valid names
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise MoetierError(f"cache size: expected an integer number of experts >= 0, got {capacity!r}")
    seqs = layer_sequences(trace)
    if layers is not None:
        missing = sorted(set(layers) - set(seqs))
        if missing:
            raise MoetierError(f"layers {missing}: not in the trace (it has layers {sorted(seqs)})")
        seqs = {lyr: seqs[lyr] for lyr in layers}
    prof: Mapping[int, Any] | None = None
    if str(policy).lower() == "static":
        if profile is None:
            prof = layer_counts(trace)
        elif isinstance(profile, Trace):
            prof = layer_counts(profile)
        else:
            prof = profile
    per_layer = []
    for lyr, seq in seqs.items():
        lp = None
        if prof is not None:
            if lyr not in prof:
                raise MoetierError(f"static policy profile: no counts for layer {lyr}")
            lp = prof[lyr]
        pol = build_policy(policy, int(capacity), seq, profile=lp, **params)
        per_layer.append(LayerResult(layer=lyr, accesses=len(seq), hits=replay(pol, seq)))
    return SimResult(policy=str(policy).lower(), capacity=int(capacity), params=dict(params), per_layer=per_layer)


def sweep(trace: Trace, policies: Sequence[str], capacities: Sequence[int]) -> dict[str, list[float]]:
    """Overall hit rate of each policy at each capacity (for plots and tables)."""
    return {p: [simulate(trace, p, c).hit_rate for c in capacities] for p in policies}


def parse_cache_size(text: str | int, num_experts: int, layer_bytes: Any = None) -> int:
    """Experts per layer from a ``--cache`` value by the one size rule
    (:func:`moetier.planner.machines.parse_size`): ``"16"`` -> 16 experts; ``"25%"`` or
    ``"0.25"`` -> a quarter of the layer's experts (rounded down); a size (``"2GB"``) -> what
    fits in that many bytes across the model's MoE layers, ``layer_bytes()`` giving the bytes
    of one expert in every MoE layer (None: sizes are refused: the trace has no byte sizes)."""
    from moetier.planner.machines import parse_size

    size = parse_size(text, "--cache", count_unit="experts per layer")
    if size.fraction is not None:
        return int(num_experts * size.fraction + 1e-9)
    if size.count is not None:
        if size.count > num_experts:
            raise MoetierError(f"--cache {text!r}: more than the {num_experts} experts of a layer")
        return size.count
    per = layer_bytes() if layer_bytes is not None else None
    if not per:
        raise MoetierError(f"--cache {text!r}: a size needs the model's expert bytes; name the model with --model, "
                           f"or give experts per layer (16), a fraction (0.25) or a percentage (25%)")
    return int(min(num_experts, (size.bytes or 0) // per))
