"""Which routed experts each rank holds (the same for every MoE layer), and which copy a
token-expert pair goes to.

* :func:`contiguous`: rank ``r`` of ``P`` holds experts ``[r*E/P, (r+1)*E/P)`` (no copies).
* :func:`from_profile`: the cluster planner's EPLB replicate-and-pack
  (:func:`moetier.planner.eplb.place`) over a routing profile summed over layers, with
  ``R`` redundant copies of the hottest experts.
* :func:`rank0_heavy`: rank 0 holds the N hottest experts, the other ranks the rest (write it
  with :meth:`EPPlacement.save`, run it with ``--placement``).

A placement is written/read as JSON (``{"format": "moetier.ep_placement/1", "num_experts",
"device_experts": [[...], ...]}``); one that leaves an expert on no rank is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetier.errors import ConfigError

FORMAT = "moetier.ep_placement/1"


@dataclass(frozen=True)
class EPPlacement:
    num_experts: int
    device_experts: tuple[tuple[int, ...], ...]  # expert ids held by each rank (sorted)

    def __post_init__(self) -> None:
        where = "expert placement"
        if not self.device_experts:
            raise ConfigError(f"{where}: 'device_experts' is empty (expected one list per rank)")
        held = set()
        for r, ex in enumerate(self.device_experts):
            bad = [e for e in ex if not 0 <= e < self.num_experts]
            if bad:
                raise ConfigError(f"{where}: rank {r} holds expert {bad[0]}, expected ids in [0, {self.num_experts})")
            held |= set(ex)
        missing = sorted(set(range(self.num_experts)) - held)
        if missing:
            raise ConfigError(f"{where}: experts {missing[:8]}{' ...' if len(missing) > 8 else ''} are held by "
                              f"no rank (every one of the {self.num_experts} experts needs a copy)")

    @property
    def ranks(self) -> int:
        return len(self.device_experts)

    def owners(self) -> list[list[int]]:
        """Ranks holding each expert: ``owners()[e]`` (ascending)."""
        own: list[list[int]] = [[] for _ in range(self.num_experts)]
        for r, ex in enumerate(self.device_experts):
            for e in sorted(set(ex)):
                own[e].append(r)
        return own

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "num_experts": self.num_experts,
                "device_experts": [list(d) for d in self.device_experts]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")


def contiguous(num_experts: int, ranks: int) -> EPPlacement:
    if not 1 <= ranks <= num_experts:
        raise ConfigError(f"--ep {ranks}: expected 1..{num_experts} ranks (the model has {num_experts} experts)")
    bounds = [r * num_experts // ranks for r in range(ranks + 1)]
    return EPPlacement(num_experts, tuple(tuple(range(bounds[r], bounds[r + 1])) for r in range(ranks)))


def profile_loads(path: str | Path) -> np.ndarray:
    """Per-expert load summed over layers, from anything :func:`moetier.planner.eplb.load_profile`
    reads (a model's routing_profile.json, a load list, a routing trace)."""
    from moetier.planner import eplb

    a = eplb.load_profile(path)
    return a.sum(axis=0) if a.ndim == 2 else a


def from_profile(loads: np.ndarray, ranks: int, redundant: int) -> EPPlacement:
    """EPLB (cluster planner) placement: ``redundant`` extra copies of the hottest experts."""
    from moetier.planner import eplb

    if redundant < 0:
        raise ConfigError(f"--redundant-experts {redundant}: expected >= 0")
    pl = eplb.place(loads, ranks, redundant)
    return EPPlacement(len(loads), tuple(tuple(d) for d in pl.device_experts))


def rank0_heavy(loads: np.ndarray, ranks: int, rank0_experts: int) -> EPPlacement:
    """Rank 0 (which also runs attention, routers and the head under ``direct``) holds the
    ``rank0_experts`` hottest experts by ``loads``; the others are dealt to ranks 1..P-1 in
    descending load, one each in turn (no copies). More of a decode step's pairs stay on rank 0,
    and a layer whose pairs all do sends no message (docs/expert-parallel.md: measured)."""
    E = len(loads)
    if ranks < 2 or not 0 < rank0_experts <= E - (ranks - 1):
        raise ConfigError(f"rank 0 holding {rank0_experts} of {E} experts with {ranks} ranks: expected "
                          f"1..{E - ranks + 1} (every other rank needs one)")
    hot = sorted(range(E), key=lambda e: (-float(loads[e]), e))
    dev: list[list[int]] = [sorted(hot[:rank0_experts])] + [[] for _ in range(ranks - 1)]
    for i, e in enumerate(hot[rank0_experts:]):
        dev[1 + i % (ranks - 1)].append(e)
    return EPPlacement(E, tuple(tuple(sorted(d)) for d in dev))


def load(path: str | Path, num_experts: int, ranks: int) -> EPPlacement:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"placement {p}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"placement {p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"placement {p}: expected a JSON object with \"format\": \"{FORMAT}\"")
    dev = data.get("device_experts")
    if not isinstance(dev, list) or not all(isinstance(d, list) and all(isinstance(e, int) for e in d) for d in dev):
        raise ConfigError(f"placement {p}: 'device_experts' must be a list of lists of expert ids")
    if data.get("num_experts") != num_experts:
        raise ConfigError(f"placement {p}: num_experts is {data.get('num_experts')}, the model has {num_experts}")
    if len(dev) != ranks:
        raise ConfigError(f"placement {p}: {len(dev)} ranks in the file, the job has {ranks}")
    try:
        return EPPlacement(num_experts, tuple(tuple(sorted(d)) for d in dev))
    except ConfigError as e:
        raise ConfigError(f"placement {p}: {str(e).removeprefix('expert placement: ')}") from None
