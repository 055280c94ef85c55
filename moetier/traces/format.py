"""The moetier routing-trace format: one columnar numpy ``.npz`` file.

One row per (token, MoE layer). Columns (all the same length ``N``):

==================  ===========  ===============================================================
name                dtype/shape  meaning
==================  ===========  ===============================================================
``request``         int32 [N]    request id (index into ``meta["requests"]`` when present)
``position``        int32 [N]    token position in the request (-1: unknown)
``phase``           int8  [N]    0 prefill, 1 decode, -1 unknown
``layer``           int32 [N]    decoder layer index of the MoE layer
``step``            int32 [N]    forward pass (engine step) the row belongs to (-1: unknown)
``topk_ids``        int32 [N,k]  routed experts, router order
``topk_weights``    float32[N,k] their gate weights (NaN when the source has none)
``pred_ids``        int32 [N,p]  optional: experts the prefetcher predicted for this row
                                 (made from the previous layer's hidden state); -1 padding
``meta``            str (0-d)    JSON provenance, see below
==================  ===========  ===============================================================

``meta`` keys: ``format`` ("moetier-trace"), ``version`` (1), ``model`` (HF id or name),
``num_experts``, ``top_k``, ``config_hash`` (sha256 of the config.json, or null),
``prompt_set``, ``software`` (dict name -> version), ``source_file``, ``rows_dropped``,
``notes`` (list of strings), ``requests`` (list of request names, optional).

Rows are in the order the engine produced them. Load with :func:`load_trace` (validates
every column and names the file and field on error), save with :func:`save_trace`.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moetier.errors import MoetierError

FORMAT = "moetier-trace"
VERSION = 1
PREFILL, DECODE, UNKNOWN_PHASE = 0, 1, -1

_COLUMNS = {
    "request": np.int32,
    "position": np.int32,
    "phase": np.int8,
    "layer": np.int32,
    "step": np.int32,
}


class TraceError(MoetierError):
    """A trace file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Trace:
    """A routing trace in memory (columns as numpy arrays, provenance as a dict)."""

    request: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    step: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    pred_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_experts(self) -> int:
        n = self.meta.get("num_experts")
        if n:
            return int(n)
        return int(self.topk_ids.max()) + 1 if len(self) else 0

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in np.unique(self.layer))

    @property
    def model(self) -> str:
        return str(self.meta.get("model") or "unknown")

    def select(self, mask: np.ndarray) -> Trace:
        """The rows where ``mask`` is true (same provenance)."""
        return replace(
            self,
            request=self.request[mask], position=self.position[mask], phase=self.phase[mask],
            layer=self.layer[mask], step=self.step[mask], topk_ids=self.topk_ids[mask],
            topk_weights=self.topk_weights[mask],
            pred_ids=None if self.pred_ids is None else self.pred_ids[mask],
        )


def make_trace(
    *,
    topk_ids: Any,
    layer: Any,
    topk_weights: Any = None,
    request: Any = None,
    position: Any = None,
    phase: Any = None,
    step: Any = None,
    pred_ids: Any = None,
    meta: dict[str, Any] | None = None,
    source: str = "<memory>",
) -> Trace:
    """Build and validate a Trace from array-likes (missing columns get their 'unknown' value)."""
    ids = np.asarray(topk_ids)
    if ids.ndim != 2:
        raise TraceError(f"{source}: field topk_ids: expected a 2-D [rows, k] array, got shape {ids.shape}")
    n = ids.shape[0]

    def col(x: Any, name: str, default: int) -> np.ndarray:
        if x is None:
            return np.full(n, default, dtype=_COLUMNS[name])
        return np.asarray(x)

    t = Trace(
        request=col(request, "request", 0),
        position=col(position, "position", -1),
        phase=col(phase, "phase", UNKNOWN_PHASE),
        layer=np.asarray(layer) if layer is not None else np.zeros(n, np.int32),
        step=col(step, "step", -1),
        topk_ids=ids,
        topk_weights=(np.full(ids.shape, np.nan, np.float32) if topk_weights is None
                      else np.asarray(topk_weights)),
        meta=_default_meta(meta or {}, ids),
        pred_ids=None if pred_ids is None else np.asarray(pred_ids),
    )
    return validate(t, source)


def _default_meta(meta: dict[str, Any], ids: np.ndarray) -> dict[str, Any]:
    out = {
        "format": FORMAT,
        "version": VERSION,
        "model": None,
        "num_experts": int(ids.max()) + 1 if ids.size else 0,
        "top_k": int(ids.shape[1]),
        "config_hash": None,
        "prompt_set": None,
        "software": {},
        "source_file": None,
        "rows_dropped": 0,
        "notes": [],
    }
    out.update(meta)
    return out


def _int_column(arr: np.ndarray, name: str, dtype: Any, n: int, source: str) -> np.ndarray:
    if arr.ndim != 1 or arr.shape[0] != n:
        raise TraceError(f"{source}: field {name}: expected shape ({n},), got {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass
        else:
            raise TraceError(f"{source}: field {name}: expected integers, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def validate(t: Trace, source: str = "<memory>") -> Trace:
    """Check shapes, dtypes and value ranges; returns a Trace with canonical dtypes."""
    ids = t.topk_ids
    if ids.ndim != 2:
        raise TraceError(f"{source}: field topk_ids: expected a 2-D [rows, k] array, got shape {ids.shape}")
    n, k = ids.shape
    if k < 1:
        raise TraceError(f"{source}: field topk_ids: expected k >= 1 experts per row, got {k}")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{source}: field topk_ids: expected integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int32, copy=False)
    if n and ids.min() < 0:
        r = int(np.argwhere(ids < 0)[0][0])
        raise TraceError(f"{source}: field topk_ids: row {r} has a negative expert id")
    meta = dict(t.meta)
    ne = meta.get("num_experts")
    if ne is not None:
        if not isinstance(ne, int) or isinstance(ne, bool) or (n and ne < 1):
            raise TraceError(f"{source}: meta.num_experts: expected a positive integer, got {ne!r}")
        if n and ids.max() >= ne:
            r = int(np.argwhere(ids >= ne)[0][0])
            raise TraceError(
                f"{source}: field topk_ids: row {r} has expert id {int(ids[r].max())} >= meta.num_experts={ne}"
            )
    if n:
        srt = np.sort(ids, axis=1)
        dup = np.any(srt[:, 1:] == srt[:, :-1], axis=1)
        if dup.any():
            r = int(np.argmax(dup))
            raise TraceError(f"{source}: field topk_ids: row {r} selects the same expert twice ({ids[r].tolist()})")
    w = t.topk_weights
    if w.shape != (n, k):
        raise TraceError(f"{source}: field topk_weights: expected shape {(n, k)}, got {w.shape}")
    if n and not np.issubdtype(w.dtype, np.floating):
        raise TraceError(f"{source}: field topk_weights: expected floats, got dtype {w.dtype}")
    cols = {name: _int_column(np.asarray(getattr(t, name)), name, dt, n, source) for name, dt in _COLUMNS.items()}
    if n and cols["layer"].min() < 0:
        raise TraceError(f"{source}: field layer: negative layer index")
    bad_phase = ~np.isin(cols["phase"], (PREFILL, DECODE, UNKNOWN_PHASE))
    if bad_phase.any():
        r = int(np.argmax(bad_phase))
        raise TraceError(f"{source}: field phase: row {r} has {int(cols['phase'][r])}; expected 0 (prefill), "
                         "1 (decode) or -1 (unknown)")
    pred = t.pred_ids
    if pred is not None:
        pred = np.asarray(pred)
        if pred.ndim != 2 or pred.shape[0] != n or not np.issubdtype(pred.dtype, np.integer):
            raise TraceError(f"{source}: field pred_ids: expected an integer [{n}, p] array, got "
                             f"{pred.dtype} {pred.shape}")
        pred = pred.astype(np.int32, copy=False)
        if pred.size and pred.min() < -1:
            raise TraceError(f"{source}: field pred_ids: expert ids must be >= 0 (-1 = padding)")
    meta.setdefault("format", FORMAT)
    if meta.get("format") != FORMAT:
        raise TraceError(f"{source}: meta.format: expected {FORMAT!r}, got {meta.get('format')!r}")
    meta.setdefault("version", VERSION)
    if meta.get("version") != VERSION:
        raise TraceError(f"{source}: meta.version: this moetier reads version {VERSION}, got {meta.get('version')!r}")
    meta.setdefault("top_k", k)
    if meta["top_k"] != k:
        raise TraceError(f"{source}: meta.top_k={meta['top_k']} but field topk_ids has k={k}")
    return Trace(topk_ids=ids, topk_weights=w.astype(np.float32, copy=False), meta=meta, pred_ids=pred, **cols)


def save_trace(t: Trace, path: str | Path) -> Path:
    """Write ``t`` as a compressed .npz (the extension is added if missing)."""
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")
    t = validate(t, str(p))
    arrays = {name: getattr(t, name) for name in _COLUMNS}
    arrays["topk_ids"] = t.topk_ids
    arrays["topk_weights"] = t.topk_weights
    if t.pred_ids is not None:
        arrays["pred_ids"] = t.pred_ids
    arrays["meta"] = np.array(json.dumps(t.meta, sort_keys=True, default=str))
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, **arrays)
    return p


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace .npz; errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: no such trace file")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise TraceError(f"{p}: not a moetier trace .npz ({e})") from None
    for name in ("topk_ids", "layer", "meta"):
        if name not in data:
            raise TraceError(f"{p}: missing field {name!r} (has: {', '.join(sorted(data)) or 'nothing'})")
    try:
        meta = json.loads(str(data["meta"]))
    except json.JSONDecodeError as e:
        raise TraceError(f"{p}: field meta: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{p}: field meta: expected a JSON object")
    ids = data["topk_ids"]
    n = ids.shape[0] if ids.ndim else 0
    cols = {name: data.get(name) for name in _COLUMNS}
    for name, default in (("request", 0), ("position", -1), ("phase", -1), ("step", -1)):
        if cols[name] is None:
            cols[name] = np.full(n, default, dtype=_COLUMNS[name])
    w = data.get("topk_weights")
    if w is None:
        w = np.full(ids.shape, np.nan, np.float32)
    t = Trace(topk_ids=ids, topk_weights=w, meta=meta, pred_ids=data.get("pred_ids"), **cols)
    return validate(t, str(p))
