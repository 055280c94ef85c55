"""Expert placement and replication under expert parallelism (pure functions).

Problem: ``E`` routed experts of one MoE layer, with a measured (or modelled) load each (tokens
routed to it per step, any unit), must be spread over ``D`` devices with ``S`` expert *slots*
each (``S * D >= E + R``), where ``R`` slots hold redundant copies of hot experts. A token routed
to a replicated expert goes to one of its copies, so a copy carries ``load / replicas``. All
devices wait for the slowest one at every MoE layer (the all-to-all is a barrier), so the cost
of a placement is ``max(device load) / mean(device load)`` -- the *imbalance*: the MoE compute
and the received all-to-all bytes of the step are scaled by it.

Algorithm (designed here; the idea of "replicate the heaviest, then pack" is DeepSeek's EPLB,
described in their inference-system write-up; this is an independent implementation):

1. **Replicate** (:func:`replicate`): hand out the ``R`` redundant slots one at a time, each to
   the expert whose per-copy load (``load / copies``) is currently the largest (a max-heap).
   This minimises the largest per-copy load, the lower bound of any placement's max.
2. **Pack** (:func:`place`): sort the copies by per-copy load, heaviest first, and put each on
   the least-loaded device that still has a free slot and does not already hold a copy of the
   same expert (longest-processing-time first, with slot limits).
3. **Refine**: repeatedly try to swap one copy of the heaviest device with one copy (or an
   empty slot) of another device when that lowers the larger of the two loads; stop when no
   swap helps or after a bounded number of rounds.

Also here: the sampling-noise factor of a finite batch (:func:`noise_factor`), a Zipf load
profile (:func:`zipf_loads`) and a reader for load profiles / routing traces
(:func:`load_profile`).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetier.errors import MoetierError


@dataclass(frozen=True)
class Placement:
    """Where each expert copy lives and what each device carries."""

    replicas: tuple[int, ...]  # copies per expert (>= 1)
    device_experts: tuple[tuple[int, ...], ...]  # expert ids held by each device
    device_loads: tuple[float, ...]  # load carried by each device

    @property
    def num_devices(self) -> int:
        return len(self.device_loads)

    @property
    def max_load(self) -> float:
        return max(self.device_loads)

    @property
    def mean_load(self) -> float:
        return sum(self.device_loads) / len(self.device_loads)

    @property
    def imbalance(self) -> float:
        """max / mean device load (1.0 = perfectly balanced)."""
        m = self.mean_load
        return self.max_load / m if m > 0 else 1.0

    def to_json(self) -> dict:
        return {
            "num_devices": self.num_devices,
            "replicas": list(self.replicas),
            "device_experts": [list(d) for d in self.device_experts],
            "device_loads": list(self.device_loads),
            "max_load": self.max_load,
            "mean_load": self.mean_load,
            "imbalance": self.imbalance,
        }


def _check_loads(loads: Sequence[float]) -> np.ndarray:
    a = np.asarray(loads, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise MoetierError("routing profile: expected a non-empty list of per-expert loads")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise MoetierError("routing profile: per-expert loads must be finite and >= 0")
    return a


def replicate(loads: Sequence[float], n_redundant: int) -> list[int]:
    """Copies per expert after giving ``n_redundant`` extra copies to the heaviest per-copy loads."""
    a = _check_loads(loads)
    if n_redundant < 0:
        raise MoetierError(f"redundant_experts must be >= 0, got {n_redundant}")
    reps = [1] * a.size
    heap = [(-float(x), i) for i, x in enumerate(a)]
    heapq.heapify(heap)
    for _ in range(n_redundant):
        _, i = heapq.heappop(heap)
        reps[i] += 1
        heapq.heappush(heap, (-float(a[i]) / reps[i], i))
    return reps


def _slots(n_experts: int, n_devices: int, n_redundant: int, slots_per_device: int | None) -> int:
    if n_devices < 1:
        raise MoetierError(f"devices must be >= 1, got {n_devices}")
    need = n_experts + n_redundant
    s = slots_per_device if slots_per_device is not None else math.ceil(need / n_devices)
    if s < 1 or s * n_devices < need:
        raise MoetierError(
            f"slots_per_device={s} x devices={n_devices} cannot hold {n_experts} experts + "
            f"{n_redundant} redundant copies"
        )
    return s


def place(
    loads: Sequence[float],
    n_devices: int,
    n_redundant: int = 0,
    *,
    slots_per_device: int | None = None,
    refine_rounds: int = 200,
) -> Placement:
    """Replicate the heaviest experts, then bin-pack copies onto devices (see module doc)."""
    a = _check_loads(loads)
    s = _slots(a.size, n_devices, n_redundant, slots_per_device)
    reps = replicate(a, n_redundant)
    copies = sorted(
        ((float(a[e]) / reps[e], e) for e in range(a.size) for _ in range(reps[e])),
        key=lambda t: (-t[0], t[1]),
    )
    dev_items: list[list[tuple[float, int]]] = [[] for _ in range(n_devices)]
    dev_load = [0.0] * n_devices
    heap = [(0.0, d) for d in range(n_devices)]  # (load, device) of devices with a free slot
    for w, e in copies:
        skipped = []
        chosen = None
        while heap:
            ld, d = heapq.heappop(heap)
            if any(x == e for _, x in dev_items[d]):
                skipped.append((ld, d))
                continue
            chosen = d
            break
        if chosen is None:  # every free device already holds this expert: allow a duplicate
            chosen = min(skipped)[1]
            skipped = [t for t in skipped if t[1] != chosen]
        for t in skipped:
            heapq.heappush(heap, t)
        dev_items[chosen].append((w, e))
        dev_load[chosen] += w
        if len(dev_items[chosen]) < s:
            heapq.heappush(heap, (dev_load[chosen], chosen))
    _refine(dev_items, dev_load, s, refine_rounds)
    return Placement(
        replicas=tuple(reps),
        device_experts=tuple(tuple(sorted(e for _, e in items)) for items in dev_items),
        device_loads=tuple(dev_load),
    )


def _refine(items: list[list[tuple[float, int]]], load: list[float], slots: int, rounds: int) -> None:
    """Swap copies off the heaviest device while that lowers the pair's larger load."""
    for _ in range(rounds):
        h = max(range(len(load)), key=load.__getitem__)
        best = None  # (new pair max, hi index, device, lo index or -1)
        for d in range(len(load)):
            if d == h:
                continue
            held_d = {e for _, e in items[d]}
            held_h = {e for _, e in items[h]}
            for i, (wh, eh) in enumerate(items[h]):
                if eh in held_d:
                    continue
                cands = [(wd, ed, j) for j, (wd, ed) in enumerate(items[d])]
                if len(items[d]) < slots:
                    cands.append((0.0, -1, -1))
                for wd, ed, j in cands:
                    if wd >= wh or (ed >= 0 and ed in held_h):
                        continue
                    new_h, new_d = load[h] - wh + wd, load[d] - wd + wh
                    m = max(new_h, new_d)
                    if m < load[h] - 1e-12 and (best is None or m < best[0]):
                        best = (m, i, d, j)
        if best is None:
            return
        _, i, d, j = best
        wh, eh = items[h][i]
        if j >= 0:
            wd, ed = items[d][j]
            items[h][i] = (wd, ed)
            items[d][j] = (wh, eh)
        else:
            wd = 0.0
            items[h].pop(i)
            items[d].append((wh, eh))
        load[h] += wd - wh
        load[d] += wh - wd


def static_placement(loads: Sequence[float], n_devices: int) -> Placement:
    """No replication: contiguous id ranges, device ``d`` holding ``[d*E//D, (d+1)*E//D)``."""
    a = _check_loads(loads)
    _slots(a.size, n_devices, 0, None)
    E = a.size
    dev = [list(range(d * E // n_devices, (d + 1) * E // n_devices)) for d in range(n_devices)]
    return Placement(
        replicas=(1,) * a.size,
        device_experts=tuple(tuple(d) for d in dev),
        device_loads=tuple(float(sum(a[e] for e in d)) for d in dev),
    )


def noise_factor(pairs_per_device: float, n_devices: int) -> float:
    """Expected max/mean of per-device token-expert pairs from sampling noise alone.

    Even with perfectly balanced expected loads, a step's ``lambda`` pairs per device are a
    random draw: Poisson with standard deviation ``sqrt(lambda)``; the expected maximum of
    ``D`` such draws is about ``lambda + sqrt(2 ln D * lambda)`` (Gaussian extreme value
    approximation). Large prefill batches make this ~1.0; small decode batches do not.
    """
    if pairs_per_device <= 0 or n_devices <= 1:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(n_devices) / pairs_per_device)


def zipf_loads(n_experts: int, s: float, seed: int = 0) -> np.ndarray:
    """Loads proportional to ``1 / rank**s`` (s = 0: uniform), normalised to mean 1.

    Ranks are assigned to expert ids by a seeded permutation, so hot experts are scattered over
    the id space as in real routing (the contiguous static placement does not get them for free).
    """
    if n_experts < 1:
        raise MoetierError(f"n_experts must be >= 1, got {n_experts}")
    if not math.isfinite(s) or s < 0:
        raise MoetierError(f"zipf parameter must be >= 0, got {s}")
    w = 1.0 / np.arange(1, n_experts + 1, dtype=float) ** s
    w = w / w.mean()
    perm = np.random.default_rng(seed).permutation(n_experts)
    out = np.empty(n_experts)
    out[perm] = w
    return out


def mean_imbalance(loads: Sequence[float] | np.ndarray, n_devices: int, n_redundant: int = 0,
                   *, packed: bool | None = None) -> float:
    """Placement imbalance of a 1-D profile, or the mean over the rows (layers) of a 2-D one.

    ``packed`` None: EPLB placement when there are redundant slots, else the static contiguous
    placement (what a deployment without rebalancing does); True/False force either.
    """
    a = np.asarray(loads, dtype=float)
    rows = a if a.ndim == 2 else a[None, :]
    use_pack = (n_redundant > 0) if packed is None else packed
    vals = [(place(r, n_devices, n_redundant, refine_rounds=50) if use_pack else static_placement(r, n_devices))
            .imbalance for r in rows if r.sum() > 0]
    return float(np.mean(vals)) if vals else 1.0


def load_profile(path: str | Path, *, layer: int | None = None, warmup_repeat: int | None = None) -> np.ndarray:
    """Per-expert loads from a file: 1-D ``[experts]`` or 2-D ``[layers, experts]``.

    Accepts a JSON list of numbers, a JSON object with a ``loads`` list (or ``expert_counts``),
    a model's ``routing_profile.json`` (``moetier.routing_profile/1``: ``layers[*].counts``),
    the JSON of ``moetier trace stats`` (``per_layer[*].load``, one row per layer), a moetier
    trace ``.npz`` (counts per layer), or a routing trace in the ``.jsonl`` format of
    ``shared/data/routing-traces`` (a ``meta`` line, then ``route`` lines with ``topk_ids``).
    Traces are read by :func:`moetier.traces.importers.open_trace`, which drops the capture
    engine's warm-up rows (``warmup_repeat`` overrides its repeat threshold).
    """
    p = Path(path)
    if not p.is_file():
        raise MoetierError(f"routing profile {p}: no such file")
    if p.suffix in (".npz", ".jsonl"):
        # One loader for traces (it also drops the capture engine's warm-up rows).
        from moetier.traces.importers import open_trace

        t = open_trace(p) if warmup_repeat is None else open_trace(p, warmup_repeats=warmup_repeat)
        layers = [lyr for lyr in t.layers if layer is None or lyr == layer]
        if not layers:
            raise MoetierError(f"routing profile {p}: no rows for layer {layer}")
        n = int(t.num_experts)
        rows2 = [np.bincount(t.topk_ids[t.layer == lyr].ravel().astype(np.int64), minlength=n)[:n]
                 for lyr in layers]
        out = np.stack(rows2).astype(float)
        return out[0] if (p.suffix == ".jsonl" and len(layers) == 1) else out
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MoetierError(f"routing profile {p}: not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("per_layer"), list):
        rows = [d.get("load") for d in data["per_layer"]
                if isinstance(d, dict) and (layer is None or d.get("layer") == layer)]
        if not rows or not all(isinstance(r, list) and r for r in rows) or len({len(r) for r in rows}) != 1:
            raise MoetierError(f"routing profile {p}: 'per_layer' entries need equal-length 'load' lists")
        return np.stack([_check_loads(r) for r in rows])
    if isinstance(data, dict) and isinstance(data.get("layers"), list):  # moetier.routing_profile/1
        rows = [d.get("counts") for d in data["layers"]
                if isinstance(d, dict) and (layer is None or d.get("layer") == layer)]
        if not rows or not all(isinstance(r, list) and r for r in rows) or len({len(r) for r in rows}) != 1:
            raise MoetierError(f"routing profile {p}: 'layers' entries need equal-length 'counts' lists")
        return np.stack([_check_loads(r) for r in rows])
    if isinstance(data, dict):
        data = data.get("loads", data.get("expert_counts"))
    if not isinstance(data, list) or not all(isinstance(x, (int, float)) for x in data):
        raise MoetierError(f"routing profile {p}: expected a list of per-expert loads (or {{'loads': [...]}})")
    return _check_loads(data)
