"""Record a routing trace from the moetier runtime through its router observer.

Contract used (docs/ARCHITECTURE.md): ``Model.add_router_observer(fn)``; every MoE layer
calls ``fn(layer, topk_ids [T, k], topk_weights [T, k])`` once per forward pass with the
flat token batch. :func:`record_trace` runs the prompts one request at a time, so in each
request the first call of a layer is the prefill (T = prompt tokens) and later calls are
decode steps; positions continue across them.

:class:`TraceRecorder` is the observer itself and does not need a model, so any source that
calls it with the same arguments (a test double, a server engine) can build a trace.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from moetier.errors import MoetierError
from moetier.traces.format import DECODE, PREFILL, Trace, TraceError, make_trace


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "float") and str(getattr(x, "dtype", "")).startswith("torch.bfloat16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


class TraceRecorder:
    """Router observer collecting rows; call :meth:`begin_request` before each request."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]] = []
        self._request = -1
        self._pos: dict[int, int] = {}  # layer -> next position in the current request
        self._calls: dict[int, int] = {}  # layer -> forward passes seen (the engine step)
        self.requests: list[str] = []
        self._k: int | None = None

    def begin_request(self, name: str | None = None) -> int:
        self._request += 1
        self._pos = {}
        self.requests.append(name or f"r{self._request}")
        return self._request

    def __call__(self, layer: int, topk_ids: Any, topk_weights: Any) -> None:
        if self._request < 0:
            self.begin_request()
        ids = _to_numpy(topk_ids).astype(np.int32)
        w = _to_numpy(topk_weights).astype(np.float32)
        if ids.ndim == 1:
            ids, w = ids[None, :], w.reshape(1, -1)
        if ids.ndim != 2 or w.shape != ids.shape:
            raise TraceError(f"router observer: layer {layer}: expected topk_ids and topk_weights of shape "
                             f"[T, k], got {ids.shape} and {w.shape}")
        if self._k is None:
            self._k = ids.shape[1]
        elif ids.shape[1] != self._k:
            raise TraceError(f"router observer: layer {layer}: k changed from {self._k} to {ids.shape[1]}")
        layer = int(layer)
        start = self._pos.get(layer, 0)
        t = ids.shape[0]
        phase = PREFILL if start == 0 else DECODE
        pos = np.arange(start, start + t, dtype=np.int32)
        self._pos[layer] = start + t
        step = self._calls.get(layer, 0)
        self._calls[layer] = step + 1
        self._rows.append((layer, ids, w, pos, np.full(t, phase, np.int8), step, self._request))

    def __len__(self) -> int:
        return sum(r[1].shape[0] for r in self._rows)

    def to_trace(self, meta: dict[str, Any] | None = None) -> Trace:
        if not self._rows:
            raise TraceError("router observer: no routing was observed (is the model a MoE model?)")
        rows = self._rows
        return make_trace(
            topk_ids=np.concatenate([x[1] for x in rows]),
            topk_weights=np.concatenate([x[2] for x in rows]),
            layer=np.concatenate([np.full(x[1].shape[0], x[0], np.int32) for x in rows]),
            position=np.concatenate([x[3] for x in rows]),
            phase=np.concatenate([x[4] for x in rows]),
            step=np.concatenate([np.full(x[1].shape[0], x[5], np.int32) for x in rows]),
            request=np.concatenate([np.full(x[1].shape[0], x[6], np.int32) for x in rows]),
            meta={**(meta or {}), "requests": list(self.requests)},
            source="router observer",
        )


def software_versions() -> dict[str, str]:
    out = {}
    for pkg in ("moetier", "numpy", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_hash(raw: Any) -> str | None:
    try:
        blob = json.dumps(dict(raw), sort_keys=True, default=str).encode()
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(blob).hexdigest()


def read_prompts(path: str | Path) -> list[Any]:
    """One prompt per line; a JSON line may hold {"prompt": str} or {"messages": [...]}."""
    p = Path(path)
    if not p.is_file():
        raise MoetierError(f"--prompts {p}: no such file")
    out: list[Any] = []
    for lineno, raw in enumerate(p.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MoetierError(f"--prompts {p}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                               f"{e.start + 1}); save the file as UTF-8") from None
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise MoetierError(f"{p}:{lineno}: not valid JSON ({e})") from None
            if isinstance(obj.get("messages"), list):
                out.append(obj["messages"])
            elif isinstance(obj.get("prompt"), str):
                out.append(obj["prompt"])
            else:
                raise MoetierError(f"{p}:{lineno}: expected a 'prompt' string or a 'messages' list")
        else:
            out.append(s)
    if not out:
        raise MoetierError(f"--prompts {p}: no prompts in the file")
    return out


def record_trace(model: Any, prompts: Iterable[Any], *, max_tokens: int = 32, prompt_set: str | None = None,
                 model_name: str | None = None) -> Trace:
    """Generate each prompt (greedy) with ``model`` and record its routing."""
    if max_tokens < 1:
        raise MoetierError(f"--max-tokens: expected >= 1, got {max_tokens}")
    rec = TraceRecorder()
    model.add_router_observer(rec)
    try:
        for i, prompt in enumerate(prompts):
            rec.begin_request(f"r{i}")
            model.generate(prompt, max_tokens=max_tokens, temperature=0.0)
    finally:
        remove = getattr(model, "remove_router_observer", None)
        if callable(remove):
            remove(rec)
    spec = getattr(model, "spec", None)
    meta = {
        "model": model_name or getattr(spec, "name", None),
        "num_experts": int(getattr(spec, "num_experts", 0) or 0) or None,
        "config_hash": config_hash(getattr(spec, "raw", None) or {}),
        "prompt_set": prompt_set,
        "software": software_versions(),
        "source_file": None,
        "rows_dropped": 0,
        "notes": [f"recorded by moetier, greedy, max_tokens={max_tokens}, one request at a time"],
    }
    if meta["num_experts"] is None:
        del meta["num_experts"]
    return rec.to_trace(meta)
