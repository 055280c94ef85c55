"""Server metrics and their Prometheus text rendering (no dependency on prometheus_client).

:class:`ServeMetrics` is updated by the engine thread (steps, tokens, batch sizes) and the
HTTP layer (requests by endpoint and status); :meth:`ServeMetrics.render` produces the
Prometheus text exposition format (version 0.0.4). The weight hierarchy, when the model
exposes a ``metrics`` object, is read defensively and flattened into ``moetier_weights_*``
gauges (per-tier bytes, cache hit rates, ...), whatever its exact shape.
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(*parts: str) -> str:
    name = "_".join(p for p in parts if p)
    name = _NAME_BAD.sub("_", name)
    if name and name[0].isdigit():
        name = "_" + name
    return name


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Family:
    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: Any) -> _Family:
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))
        return self

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            if labels:
                lab = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(labels.items()))
                yield f"{self.name}{{{lab}}} {_fmt(value)}"
            else:
                yield f"{self.name} {_fmt(value)}"


Labels = tuple[tuple[str, str], ...]


def flatten_numeric(
    obj: Any, prefix: tuple[str, ...] = (), labels: Labels = (), depth: int = 0
) -> list[tuple[tuple[str, ...], Labels, float]]:
    """Numeric leaves of nested mappings / dataclasses as (name path, labels, value).

    A mapping whose keys are all integers (e.g. per-layer figures) becomes a label
    (``layer="3"`` when its name mentions layers, else ``index="3"``) instead of a name part.
    None, NaN and non-numeric leaves are skipped.
    """
    out: list[tuple[tuple[str, ...], Labels, float]] = []
    if depth > 5 or obj is None:
        return out
    if isinstance(obj, bool):
        return [(prefix, labels, int(obj))]
    if isinstance(obj, (int, float)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return out
        return [(prefix, labels, obj)]
    if callable(getattr(obj, "item", None)) and getattr(obj, "ndim", 1) == 0:  # tensor / numpy scalar
        try:
            return flatten_numeric(obj.item(), prefix, labels, depth)
        except Exception:
            return out
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif hasattr(obj, "__dataclass_fields__"):
        items = [(k, getattr(obj, k, None)) for k in obj.__dataclass_fields__]
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return out
    items = [(k, v) for k, v in items if not str(k).startswith("_")]
    if items and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k, _ in items):
        label = "layer" if prefix and "layer" in prefix[-1] else "index"
        for k, v in items:
            out.extend(flatten_numeric(v, prefix, (*labels, (label, str(k))), depth + 1))
        return out
    for k, v in items:
        out.extend(flatten_numeric(v, (*prefix, str(k)), labels, depth + 1))
    return out


def _plain(m: Any) -> Any:
    for meth in ("summary", "snapshot", "as_dict", "to_dict", "to_json"):
        fn = getattr(m, meth, None)
        if callable(fn):
            return fn()
    if isinstance(m, Mapping) or hasattr(m, "__dataclass_fields__"):
        return m
    if callable(m):
        return m()
    return {k: v for k, v in vars(m).items() if not k.startswith("_")}


def model_metrics_snapshot(model: Any) -> dict[str, Any] | None:
    """The weight hierarchy's figures as plain data, or None; never raises.

    Reads, when present: ``model.hierarchy_metrics`` (or ``model.metrics``, or the expert
    provider's ``metrics``) -> ``weights``; ``model.memory_budget`` -> ``memory_budget``.
    """
    out: dict[str, Any] = {}
    try:
        m = getattr(model, "hierarchy_metrics", None)
        if m is None:
            m = getattr(model, "metrics", None)
        if m is None:
            m = getattr(getattr(model, "provider", None), "metrics", None)
        if m is not None:
            out["weights"] = _plain(m)
    except Exception:
        pass
    try:
        b = getattr(model, "memory_budget", None)
        if b is not None:
            out["memory_budget"] = _plain(b)
    except Exception:
        pass
    return out or None


def compute_path_families(model: Any) -> list[_Family]:
    """``moetier_compute_steps_total{kind, path, reason}``: forward steps by kind (decode /
    prefill / batch), the path that kind runs on (native / torch) and why; never raises."""
    fam = _Family("moetier_compute_steps_total", "counter",
                  "Forward steps by kind and the path it runs on (native/torch), with why not native.")
    try:
        for kind, p in model.compute_paths().items():
            fam.add(p["steps"], kind=kind, path=p["path"], reason=p["reason"] or "")
    except Exception:
        return []
    return [fam]


class ServeMetrics:
    """Counters and gauges of one server. Thread-safe; cheap to update per step."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self.started = time.monotonic()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.finish_reasons: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.step_sequences = 0
        self.step_tokens = 0
        self.last_batch_size = 0
        self.max_batch_size = 0
        self.cancelled = 0
        self.freed = 0
        self.engine_errors = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ---- updates
    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def observe_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def observe_step(self, sequences: int, tokens: int, generated: int, seconds: float) -> None:
        t = time.monotonic()
        with self._lock:
            self.steps += 1
            self.step_seconds += seconds
            self.step_sequences += sequences
            self.step_tokens += tokens
            self.last_batch_size = sequences
            self.max_batch_size = max(self.max_batch_size, sequences)
            self.generation_tokens += generated
            self._recent.append((t, generated))
            self._trim(t)

    def observe_admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def observe_finished(self, reason: str) -> None:
        with self._lock:
            self.finish_reasons[reason] += 1
            if reason == "cancelled":
                self.cancelled += 1

    def observe_freed(self) -> None:
        with self._lock:
            self.freed += 1

    def observe_engine_error(self) -> None:
        with self._lock:
            self.engine_errors += 1

    def _trim(self, t: float) -> None:
        while self._recent and self._recent[0][0] < t - self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        t = time.monotonic()
        with self._lock:
            self._trim(t)
            n = sum(g for _, g in self._recent)
            span = min(self.window_s, max(t - self.started, 1e-9))
        return n / span

    # ---- rendering
    def render(
        self,
        *,
        queue_depth: int,
        active: int,
        max_queue: int,
        max_batch: int,
        model_name: str,
        model_metrics: Any = None,
        kv_cache_bytes: int = 0,
        extra: Callable[[], list[_Family]] | None = None,
    ) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            fams = [
                _Family("moetier_info", "gauge", "Served model (constant 1).").add(1, model=model_name),
                _Family("moetier_uptime_seconds", "gauge", "Seconds since the server started.").add(
                    time.monotonic() - self.started
                ),
                _Family("moetier_request_queue_depth", "gauge", "Requests waiting for a batch slot.").add(queue_depth),
                _Family("moetier_request_queue_capacity", "gauge", "Bound of the request queue.").add(max_queue),
                _Family("moetier_active_sequences", "gauge", "Sequences in the running batch.").add(active),
                _Family("moetier_kv_cache_bytes", "gauge", "KV-cache bytes held by running sequences.").add(
                    kv_cache_bytes
                ),
                _Family("moetier_max_batch_sequences", "gauge", "Largest allowed running batch.").add(max_batch),
                _Family("moetier_batch_size", "gauge", "Sequences in the last engine step.").add(self.last_batch_size),
                _Family("moetier_batch_size_max", "gauge", "Largest batch seen in one engine step.").add(
                    self.max_batch_size
                ),
                _Family(
                    "moetier_generation_tokens_per_second",
                    "gauge",
                    f"Generated tokens per second over the last {self.window_s:g} s.",
                ).add(tps),
                _Family("moetier_prompt_tokens_total", "counter", "Prompt tokens admitted.").add(self.prompt_tokens),
                _Family("moetier_generation_tokens_total", "counter", "Tokens generated.").add(self.generation_tokens),
                _Family("moetier_engine_steps_total", "counter", "Batched forward steps.").add(self.steps),
                _Family("moetier_engine_step_seconds_total", "counter", "Seconds spent in forward steps.").add(
                    self.step_seconds
                ),
                _Family(
                    "moetier_engine_step_sequences_total", "counter", "Sum of sequences over steps (mean batch)."
                ).add(self.step_sequences),
                _Family("moetier_engine_step_tokens_total", "counter", "Sum of flat-batch tokens over steps.").add(
                    self.step_tokens
                ),
                _Family(
                    "moetier_engine_errors_total", "counter", "Engine faults: failed steps, requests, thread deaths."
                ).add(self.engine_errors),
                _Family("moetier_sequences_freed_total", "counter", "Sequences whose KV cache was freed.").add(
                    self.freed
                ),
            ]
            req = _Family("moetier_requests_total", "counter", "HTTP requests by endpoint and status.")
            for (endpoint, status), n in sorted(self.requests.items()):
                req.add(n, endpoint=endpoint, status=status)
            fams.append(req)
            rej = _Family("moetier_requests_rejected_total", "counter", "Requests refused before running.")
            for reason, n in sorted(self.rejected.items()):
                rej.add(n, reason=reason)
            fams.append(rej)
            fin = _Family("moetier_requests_finished_total", "counter", "Generations by finish reason.")
            for reason, n in sorted(self.finish_reasons.items()):
                fin.add(n, reason=reason)
            fams.append(fin)
        if model_metrics is not None:
            grouped: dict[str, _Family] = {}
            for path, labels, value in flatten_numeric(model_metrics):
                name = _metric_name("moetier", *path)
                fam = grouped.get(name)
                if fam is None:
                    fam = grouped[name] = _Family(name, "gauge", "Weight hierarchy: " + ".".join(path) + ".")
                fam.add(value, **dict(labels))
            fams.extend(grouped.values())
        if extra is not None:
            fams.extend(extra())
        lines: list[str] = []
        for f in fams:
            lines.extend(f.lines())
        return "\n".join(lines) + "\n"
