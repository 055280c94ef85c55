"""Hotness statistics of a routing trace (pure functions of a :class:`Trace`).

* per-layer expert load (selection counts) and its imbalance (max / mean);
* coverage: share of all selections that go to the top x% experts of a layer;
* Zipf fit of the rank-frequency curve: ``count ~ rank ** -s`` (least squares in log-log
  space over experts with a non-zero count), exponent ``s`` and R^2;
* previous-token reuse: for consecutive rows of the same request and layer, the fraction of
  a row's experts that the previous row also selected (rows in file order; for engines that
  interleave requests in one stream this is "previous row in the stream");
* reuse (LRU stack) distance: for each access, how many distinct other experts of the layer
  were used since the previous access of the same expert; ``P(distance < C)`` is exactly the
  LRU hit rate of a C-expert cache;
* cross-layer co-selection (traces with more than one layer): how well the experts of layer
  ``l`` predict those of the next traced layer for the same token;
* prefetch accuracy (traces with ``pred_ids``): recall and precision of the predictions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moetier.traces.format import Trace
from moetier.traces.simulate import layer_counts, layer_sequences


def coverage(counts: np.ndarray, fraction: float) -> float:
    """Share of selections served by the top ``fraction`` of experts (at least one expert)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = c.sum()
    if total <= 0:
        return 0.0
    n = max(1, int(round(len(c) * fraction)))
    return float(c[:n].sum() / total)


def zipf_fit(counts: np.ndarray) -> tuple[float, float]:
    """(exponent s, R^2) of ``log count = a - s log rank`` over non-zero counts."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    c = c[c > 0]
    if len(c) < 3:
        return 0.0, 0.0
    x = np.log(np.arange(1, len(c) + 1, dtype=np.float64))
    y = np.log(c)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(-slope), r2


def previous_token_reuse(trace: Trace) -> dict[int, float]:
    """Per layer: mean |experts(row) & experts(previous row of the same request)| / k."""
    out: dict[int, float] = {}
    for lyr in trace.layers:
        m = trace.layer == lyr
        ids = trace.topk_ids[m]
        req = trace.request[m]
        if len(ids) < 2:
            out[lyr] = 0.0
            continue
        same = req[1:] == req[:-1]
        if not same.any():
            out[lyr] = 0.0
            continue
        a, b = ids[1:][same], ids[:-1][same]
        overlap = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
        out[lyr] = float(overlap.mean() / ids.shape[1])
    return out


def stack_distances(seq: np.ndarray | list[int]) -> np.ndarray:
    """LRU stack distance of each access (-1 for a first access)."""
    keys = seq.tolist() if isinstance(seq, np.ndarray) else list(seq)
    stack: list[int] = []
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        try:
            d = stack.index(k)
        except ValueError:
            out[i] = -1
            stack.insert(0, k)
            continue
        out[i] = d
        if d:
            del stack[d]
            stack.insert(0, k)
    return out


def reuse_distance_summary(dist: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Histogram (index = distance), cold accesses, and percentiles of the warm distances."""
    warm = dist[dist >= 0]
    hist = np.bincount(warm, minlength=max(num_experts, 1)) if len(warm) else np.zeros(max(num_experts, 1), int)
    pct = {f"p{q}": float(np.percentile(warm, q)) for q in (25, 50, 75, 90, 99)} if len(warm) else {}
    return {"accesses": int(len(dist)), "cold": int((dist < 0).sum()), "histogram": hist.tolist(),
            "mean": float(warm.mean()) if len(warm) else 0.0, **pct}


def lru_curve_from_distances(dist: np.ndarray, capacities: list[int]) -> list[float]:
    """LRU hit rate at each capacity, from stack distances."""
    n = len(dist)
    return [float(((dist >= 0) & (dist < c)).sum() / n) if n else 0.0 for c in capacities]


def cross_layer(trace: Trace) -> list[dict[str, Any]]:
    """For consecutive traced layers (a, b): co-selection predictability of b's experts from a's.

    Rows of the two layers are paired in order (the i-th row of layer a with the i-th of b),
    which holds for traces recorded one forward pass at a time; layers with different row
    counts are skipped. ``predicted_overlap``: mean fraction of b's experts found among the
    top-k of the co-selection scores of a's experts (fitted in-sample); ``popular_overlap``:
    the same for the k most popular experts of b (baseline).
    """
    layers = trace.layers
    out: list[dict[str, Any]] = []
    n_exp = trace.num_experts
    for a, b in zip(layers[:-1], layers[1:]):
        ia, ib = trace.topk_ids[trace.layer == a], trace.topk_ids[trace.layer == b]
        if len(ia) != len(ib) or len(ia) == 0:
            continue
        k = ib.shape[1]
        co = np.zeros((n_exp, n_exp), dtype=np.float64)
        ea = np.repeat(ia, k, axis=1).reshape(-1)
        eb = np.tile(ib, (1, ia.shape[1])).reshape(-1)
        np.add.at(co, (ea, eb), 1.0)
        score = co[ia].sum(axis=1)  # [rows, n_exp]
        pred = np.argsort(-score, axis=1, kind="stable")[:, :k]
        hit = (pred[:, :, None] == ib[:, None, :]).any(axis=2).sum(axis=1)
        pop = np.argsort(-np.bincount(ib.reshape(-1), minlength=n_exp), kind="stable")[:k]
        hit_pop = np.isin(ib, pop).sum(axis=1)
        out.append({"from_layer": int(a), "to_layer": int(b), "rows": int(len(ia)),
                    "predicted_overlap": float(hit.mean() / k), "popular_overlap": float(hit_pop.mean() / k)})
    return out


def prefetch_accuracy(trace: Trace) -> dict[int, dict[str, float]]:
    """Per layer (rows with a prediction): recall = share of selected experts that were
    predicted, precision = share of predicted experts that were selected."""
    out: dict[int, dict[str, float]] = {}
    if trace.pred_ids is None:
        return out
    for lyr in trace.layers:
        m = trace.layer == lyr
        pred, ids = trace.pred_ids[m], trace.topk_ids[m]
        has = (pred >= 0).any(axis=1)
        if not has.any():
            continue
        pred, ids = pred[has], ids[has]
        hit = (ids[:, :, None] == pred[:, None, :]).any(axis=2).sum()
        n_pred = int((pred >= 0).sum())
        out[lyr] = {"rows": int(has.sum()), "recall": float(hit / ids.size),
                    "precision": float(hit / n_pred) if n_pred else 0.0}
    return out


def trace_stats(trace: Trace, fractions: tuple[float, ...] = (0.1, 0.25, 0.5)) -> dict[str, Any]:
    """All statistics as one JSON-ready dict."""
    counts = layer_counts(trace)
    seqs = layer_sequences(trace)
    reuse = previous_token_reuse(trace)
    per_layer = []
    for lyr, c in counts.items():
        s, r2 = zipf_fit(c)
        dist = stack_distances(seqs[lyr])
        mean = c.mean() if len(c) else 0.0
        per_layer.append({
            "layer": lyr,
            "rows": int((trace.layer == lyr).sum()),
            "load": c.tolist(),
            "imbalance_max_over_mean": float(c.max() / mean) if mean > 0 else 0.0,
            "unused_experts": int((c == 0).sum()),
            "coverage": {f"top{int(round(f * 100))}%": coverage(c, f) for f in fractions},
            "zipf": {"exponent": s, "r2": r2},
            "previous_token_reuse": reuse.get(lyr, 0.0),
            "reuse_distance": reuse_distance_summary(dist, trace.num_experts),
        })

    def mean_of(key: Any) -> float:
        vals = [key(p) for p in per_layer]
        return float(np.mean(vals)) if vals else 0.0

    return {
        "model": trace.meta.get("model"),
        "rows": len(trace),
        "rows_dropped": int(trace.meta.get("rows_dropped", 0) or 0),
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "layers": trace.layers,
        "summary": {
            "coverage": {f"top{int(round(f * 100))}%": mean_of(lambda p, f=f: p["coverage"][
                f"top{int(round(f * 100))}%"]) for f in fractions},
            "zipf_exponent": mean_of(lambda p: p["zipf"]["exponent"]),
            "zipf_r2": mean_of(lambda p: p["zipf"]["r2"]),
            "previous_token_reuse": mean_of(lambda p: p["previous_token_reuse"]),
            "imbalance_max_over_mean": mean_of(lambda p: p["imbalance_max_over_mean"]),
        },
        "per_layer": per_layer,
        "cross_layer": cross_layer(trace) if len(trace.layers) > 1 else [],
        "prefetch": {str(k): v for k, v in prefetch_accuracy(trace).items()},
        "notes": list(trace.meta.get("notes", [])),
    }
