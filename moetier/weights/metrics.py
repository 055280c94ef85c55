"""Per-run metrics of the weight hierarchy (exposed as ``Model.hierarchy_metrics``).

Counted per routed-expert access (one access = one unique expert needed by one MoE layer in
one forward step):

* ``resident``: a pinned expert (tier ``resident``), never read after load;
* ``hit``: served from a valid cache slot;
* ``miss``: read from the store (``prefetched`` if a background prefetch had already
  started it, ``demand`` otherwise).

Bytes per token per tier: ``resident`` = always-on bytes read per token + pinned expert
bytes used, ``cache`` = bytes of cache hits, ``store`` = bytes read from the files (demand
+ prefetch, including wasted prefetches). ``stall_seconds`` is the time the compute thread
waited for store reads. Prefetch precision = correct guesses / guesses, recall = correct
guesses / experts actually needed (in layers that had a guess).

The I/O thread adds to the byte counters, so updates take a lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerCounts:
    accesses: int = 0
    resident: int = 0
    hits: int = 0
    misses: int = 0
    decode_accesses: int = 0  # the same, counted in decode steps only
    decode_served: int = 0  # decode accesses served from RAM (resident or cache hit)


@dataclass
class HierarchyMetrics:
    expert_bytes: int = 0
    always_on_bytes_per_token: int = 0
    layers: dict[int, LayerCounts] = field(default_factory=dict)
    tokens: int = 0
    steps: int = 0
    decode_tokens: int = 0
    bytes_store_demand: int = 0
    bytes_store_prefetch: int = 0
    bytes_prefetch_wasted: int = 0
    prefetch_served: int = 0  # misses whose read a prefetch had started
    stall_seconds: float = 0.0
    read_seconds: float = 0.0  # I/O thread time inside reads
    reads: int = 0
    pf_guesses: int = 0
    pf_correct: int = 0
    pf_actual: int = 0
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ----- updates -----
    def layer(self, layer: int) -> LayerCounts:
        c = self.layers.get(layer)
        if c is None:
            c = self.layers[layer] = LayerCounts()
        return c

    def add_read(self, nbytes: int, seconds: float, prefetch: bool) -> None:
        with self._lock:
            self.reads += 1
            self.read_seconds += seconds
            if prefetch:
                self.bytes_store_prefetch += nbytes
            else:
                self.bytes_store_demand += nbytes

    def add_wasted(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_prefetch_wasted += nbytes

    def reset(self) -> None:
        """Zero every counter (e.g. after a warm-up)."""
        with self._lock:
            keep = (self.expert_bytes, self.always_on_bytes_per_token)
            for f in ("tokens", "steps", "decode_tokens", "bytes_store_demand", "bytes_store_prefetch",
                      "bytes_prefetch_wasted", "prefetch_served", "reads", "pf_guesses", "pf_correct",
                      "pf_actual"):
                setattr(self, f, 0)
            self.stall_seconds = self.read_seconds = 0.0
            self.layers = {}
            self.expert_bytes, self.always_on_bytes_per_token = keep
            self.started = time.perf_counter()

    # ----- derived -----
    def _sum(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.layers.values())

    @property
    def accesses(self) -> int:
        return self._sum("accesses")

    @property
    def hit_rate(self) -> float | None:
        """Expert accesses served from RAM (pinned or cached) / all expert accesses."""
        a = self.accesses
        return None if a == 0 else (self._sum("hits") + self._sum("resident")) / a

    @property
    def decode_hit_rate(self) -> float | None:
        """Like :attr:`hit_rate`, in decode steps only (one token per sequence): the rate the
        decode bound depends on (a prefill step touches many experts once for many tokens)."""
        a = self._sum("decode_accesses")
        return None if a == 0 else self._sum("decode_served") / a

    @property
    def cache_hit_rate(self) -> float | None:
        """Cache hits / accesses to experts that are not pinned."""
        a = self.accesses - self._sum("resident")
        return None if a <= 0 else self._sum("hits") / a

    @property
    def prefetch_precision(self) -> float | None:
        return None if self.pf_guesses == 0 else self.pf_correct / self.pf_guesses

    @property
    def prefetch_recall(self) -> float | None:
        return None if self.pf_actual == 0 else self.pf_correct / self.pf_actual

    def bytes_per_token(self) -> dict[str, float | None]:
        if self.tokens == 0:
            return {"resident": None, "cache": None, "store": None}
        t = self.tokens
        resident = self.always_on_bytes_per_token * t + self._sum("resident") * self.expert_bytes
        return {
            "resident": resident / t,
            "cache": self._sum("hits") * self.expert_bytes / t,
            "store": (self.bytes_store_demand + self.bytes_store_prefetch) / t,
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (SI units)."""
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "expert_accesses": self.accesses,
            "hit_rate": self.hit_rate,
            "decode_hit_rate": self.decode_hit_rate,
            "cache_hit_rate": self.cache_hit_rate,
            "hit_rate_per_layer": {
                str(layer): (None if c.accesses == 0 else (c.hits + c.resident) / c.accesses)
                for layer, c in sorted(self.layers.items())
            },
            "bytes_per_token": self.bytes_per_token(),
            "store_bytes_demand": self.bytes_store_demand,
            "store_bytes_prefetch": self.bytes_store_prefetch,
            "prefetch_wasted_bytes": self.bytes_prefetch_wasted,
            "prefetch_served_misses": self.prefetch_served,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "stall_seconds": self.stall_seconds,
            "store_read_seconds": self.read_seconds,
            "store_reads": self.reads,
            "store_read_bytes_per_s": ((self.bytes_store_demand + self.bytes_store_prefetch) / self.read_seconds
                                       if self.read_seconds > 0 else None),
        }
