"""Importers for third-party routing traces (and :func:`open_trace` for any supported file).

Supported inputs:

* ``*.jsonl`` from vLLM routing loggers: a ``{"type": "meta", ...}`` line, then one
  ``{"type": "route", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}`` line per
  token and layer (the files in /work/shared/data/routing-traces).
* a switch-transformer router trace ``*.json`` with ``selections[token][layer][k]``,
  ``expertsPerLayer``, ``layers``, ``topK`` and a ``source`` block (no gate weights).
* a moetier trace ``.npz`` (returned as is).

Cleaning (reported in ``meta["rows_dropped"]`` and ``meta["notes"]``): the capturing engine
ran warm-up batches of dummy tokens whose rows all repeat one ``topk_weights`` vector; rows
whose exact (layer, weight vector) occurs more than ``warmup_repeats`` times (default 48,
"a few dozen") are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetier.traces.format import PREFILL, UNKNOWN_PHASE, Trace, TraceError, load_trace, make_trace

DEFAULT_WARMUP_REPEATS = 48


@dataclass(frozen=True)
class ImportResult:
    trace: Trace
    rows_read: int
    rows_dropped: int


def catalog_name_for(model_id: str | None) -> str | None:
    """The moetier catalog name whose HF repo matches ``model_id`` (``-Chat`` etc. suffixes ok)."""
    if not model_id:
        return None
    try:
        from moetier import catalog
    except ImportError:  # pragma: no cover - catalog is part of moetier
        return None
    mid = model_id.lower()
    best: tuple[int, str] | None = None
    for name in catalog.names():
        try:
            repo = catalog.entry(name).hf_repo.lower()
        except Exception:  # a broken catalog entry must not break trace import
            continue
        if mid == repo or mid.startswith(repo + "-") or mid == name:
            if best is None or len(repo) > best[0]:
                best = (len(repo), name)
    return best[1] if best else None


def _catalog_experts(model_id: str | None) -> int | None:
    name = catalog_name_for(model_id)
    if name is None:
        return None
    try:
        from moetier import catalog

        return int(catalog.get(name).num_experts) or None
    except Exception:
        return None


def warmup_mask(layer: np.ndarray, weights: np.ndarray, max_repeats: int) -> np.ndarray:
    """True for rows whose exact (layer, weight vector) occurs more than ``max_repeats`` times."""
    n = weights.shape[0]
    if n == 0 or np.all(np.isnan(weights)):
        return np.zeros(n, dtype=bool)
    keyed = np.concatenate([layer.astype(np.float64)[:, None], weights.astype(np.float64)], axis=1)
    _, inverse, counts = np.unique(keyed, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > max_repeats


def import_jsonl(path: str | Path, *, warmup_repeats: int = DEFAULT_WARMUP_REPEATS) -> ImportResult:
    p = Path(path)
    meta_line: dict[str, Any] | None = None
    req_names: dict[str, int] = {}
    req, tok, lay, ids, wts = [], [], [], [], []
    k: int | None = None
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise TraceError(f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x}); expected JSON lines") \
                    from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{p}:{lineno}: not valid JSON ({e})") from None
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "meta":
                if meta_line is not None:
                    raise TraceError(f"{p}:{lineno}: a second meta line")
                meta_line = obj
                continue
            if kind != "route":
                raise TraceError(f"{p}:{lineno}: field type: expected 'meta' or 'route', got {kind!r}")
            try:
                rid = str(obj["req_id"])
                t_idx = int(obj["token_idx"])
                lyr = int(obj["layer"])
                e = [int(x) for x in obj["topk_ids"]]
                w = [float(x) for x in obj["topk_weights"]]
            except KeyError as ke:
                raise TraceError(f"{p}:{lineno}: route line misses field {ke.args[0]!r}") from None
            except (TypeError, ValueError) as ve:
                raise TraceError(f"{p}:{lineno}: route line has a malformed field ({ve})") from None
            if k is None:
                k = len(e)
            if len(e) != k or len(w) != k:
                raise TraceError(f"{p}:{lineno}: fields topk_ids/topk_weights: expected {k} entries each, "
                                 f"got {len(e)}/{len(w)}")
            req.append(req_names.setdefault(rid, len(req_names)))
            tok.append(t_idx)
            lay.append(lyr)
            ids.append(e)
            wts.append(w)
    if meta_line is None:
        raise TraceError(f"{p}: no meta line ({{\"type\": \"meta\", ...}}) found")
    if not ids:
        raise TraceError(f"{p}: no route lines")
    meta_k = meta_line.get("top_k")
    if meta_k is not None and meta_k != k:
        raise TraceError(f"{p}: meta top_k={meta_k} but route lines have {k} experts")
    req_a = np.asarray(req, np.int32)
    tok_a = np.asarray(tok, np.int64)
    lay_a = np.asarray(lay, np.int32)
    ids_a = np.asarray(ids, np.int32)
    w_a = np.asarray(wts, np.float32)
    rows_read = len(ids_a)

    drop = warmup_mask(lay_a, np.asarray(wts, np.float64), warmup_repeats)
    keep = ~drop
    req_a, tok_a, lay_a, ids_a, w_a = req_a[keep], tok_a[keep], lay_a[keep], ids_a[keep], w_a[keep]
    notes = [
        f"dropped {int(drop.sum())} warm-up rows (a (layer, topk_weights) vector repeated more than "
        f"{warmup_repeats} times)",
        "phase unknown: the logger does not record prefill/decode",
    ]
    # engine step: token_idx restarts at each forward pass of the engine
    step = np.full(len(tok_a), -1, np.int32)
    position = np.full(len(tok_a), -1, np.int32)
    if len(tok_a):
        resets = np.zeros(len(tok_a), dtype=bool)
        for lyr in np.unique(lay_a):
            m = np.nonzero(lay_a == lyr)[0]
            t = tok_a[m]
            r = np.zeros(len(m), dtype=bool)
            r[1:] = (t[1:] <= t[:-1]) | (req_a[m][1:] != req_a[m][:-1])
            resets[m] = r
            step[m] = np.cumsum(r)
        if resets.any():
            notes.append("token_idx restarts within a request: it indexes the engine's flattened batch, so "
                         "position is unknown (-1) and consecutive rows may belong to different requests; "
                         "step = forward pass, counted from token_idx restarts")
        else:
            position = tok_a.astype(np.int32)
            step[:] = -1
            notes.append("position = the logger's token_idx")
    model = meta_line.get("model_id")
    num_experts = meta_line.get("num_experts")
    if num_experts is None:
        num_experts = _catalog_experts(model)
        if num_experts is not None and ids_a.size and ids_a.max() >= num_experts:
            num_experts = None
        if num_experts is None:
            num_experts = int(ids_a.max()) + 1
            notes.append("num_experts inferred from the largest expert id")
        else:
            notes.append("num_experts from the moetier catalog entry of the model")
    software = {key[: -len("_version")]: str(v) for key, v in meta_line.items() if key.endswith("_version")}
    meta = {
        "model": model,
        "num_experts": int(num_experts),
        "top_k": int(k or 0),
        "prompt_set": _prompt_set_from_name(p.name),
        "software": software,
        "source_file": p.name,
        "source_meta": meta_line,
        "rows_read": rows_read,
        "rows_dropped": int(drop.sum()),
        "notes": notes,
        "requests": list(req_names),
    }
    trace = make_trace(topk_ids=ids_a, topk_weights=w_a, layer=lay_a, request=req_a, position=position,
                       phase=np.full(len(ids_a), UNKNOWN_PHASE, np.int8), step=step, meta=meta, source=str(p))
    return ImportResult(trace, rows_read, int(drop.sum()))


def _prompt_set_from_name(name: str) -> str | None:
    for known in ("gsm8k", "mmlu", "humaneval", "sharegpt", "wikitext", "c4"):
        if known in name.lower():
            return known
    return None


def import_router_json(path: str | Path) -> ImportResult:
    """A ``selections[token][layer][k]`` router trace (switch-transformer style)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "selections" not in d:
        raise TraceError(f"{p}: expected a JSON object with a 'selections' field ([token][layer][k] expert ids)")
    for fld in ("expertsPerLayer", "layers", "topK"):
        if not isinstance(d.get(fld), int) or d[fld] < 1:
            raise TraceError(f"{p}: field {fld}: expected a positive integer, got {d.get(fld)!r}")
    n_layers, k, n_exp = d["layers"], d["topK"], d["expertsPerLayer"]
    try:
        sel = np.asarray(d["selections"], dtype=np.int64)
    except (ValueError, TypeError):
        raise TraceError(f"{p}: field selections: expected a regular [token][layer][k] array of ints") from None
    if sel.ndim != 3 or sel.shape[1:] != (n_layers, k):
        raise TraceError(f"{p}: field selections: expected shape [tokens, {n_layers}, {k}], got {sel.shape}")
    if "tokens" in d and d["tokens"] != sel.shape[0]:
        raise TraceError(f"{p}: field tokens={d['tokens']} but selections has {sel.shape[0]} tokens")
    if sel.size and (sel.min() < 0 or sel.max() >= n_exp):
        raise TraceError(f"{p}: field selections: expert ids must be in [0, {n_exp})")
    T = sel.shape[0]
    ids = sel.reshape(T * n_layers, k)  # token-major: token 0 layers 0..L-1, token 1, ...
    layer = np.tile(np.arange(n_layers, dtype=np.int32), T)
    position = np.repeat(np.arange(T, dtype=np.int32), n_layers)
    src = d.get("source") or {}
    model = (src.get("model") or {}).get("id")
    software = {str(a): str(b) for a, b in (src.get("software") or {}).items()}
    meta = {
        "model": model,
        "num_experts": int(n_exp),
        "top_k": int(k),
        "prompt_set": d.get("scenario"),
        "software": software,
        "source_file": p.name,
        "source_meta": {kk: v for kk, v in d.items() if kk != "selections"},
        "rows_read": int(T * n_layers),
        "rows_dropped": 0,
        "notes": [
            "layer = index among the model's sparse (MoE) layers, not the block index",
            "no gate weights in the source: topk_weights are NaN",
            "encoder tokens: phase = prefill",
        ],
    }
    trace = make_trace(topk_ids=ids, layer=layer, position=position, request=np.zeros(len(ids), np.int32),
                       phase=np.full(len(ids), PREFILL, np.int8), meta=meta, source=str(p))
    return ImportResult(trace, int(T * n_layers), 0)


def import_file(path: str | Path, *, warmup_repeats: int = DEFAULT_WARMUP_REPEATS) -> ImportResult:
    """Import any supported third-party trace (format chosen from the content)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: no such trace file")
    if p.suffix == ".npz":
        t = load_trace(p)
        return ImportResult(t, len(t) + int(t.meta.get("rows_dropped", 0)), int(t.meta.get("rows_dropped", 0)))
    with p.open("rb") as f:
        head = f.read(4096).lstrip()
    if p.suffix == ".jsonl" or head.startswith(b'{"type"'):
        return import_jsonl(p, warmup_repeats=warmup_repeats)
    if p.suffix == ".json" or head.startswith(b"{"):
        return import_router_json(p)
    raise TraceError(f"{p}: unknown trace format (expected .npz, a routing .jsonl or a router-trace .json)")


def open_trace(path: str | Path, *, warmup_repeats: int = DEFAULT_WARMUP_REPEATS) -> Trace:
    """A moetier .npz trace, or a third-party file imported on the fly."""
    return import_file(path, warmup_repeats=warmup_repeats).trace
