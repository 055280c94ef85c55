"""Published measurements the cluster planner is fitted on and validated against.

The figures live in ``moetier/data/published/*.json`` (one file per source: the measured
value, its conditions, the layout that reproduces them, the source and a confidence letter).
This module loads them, predicts each with :func:`moetier.planner.cluster.plan_cluster`,
fits the few global factors of :class:`moetier.planner.calibration.Calibration` (a coarse
coordinate search minimising the largest |log error|), and validates honestly:
leave-one-chip-out (LOCO) refits without a chip's figures and predicts that chip's figures
with the constants found without them.

Metrics (per device, as the figure's ``metric`` says):

* ``output tokens/s per device`` (decode), ``input tokens/s per device`` (prefill, cache hits
  counted as DeepSeek counts them), ``tokens/s per user`` (decode per-user speed);
* ``total tokens/s per device (aggregated)``: prefill and decode on the same device; a request
  of ``isl`` input and ``osl`` output tokens costs ``osl / D + isl / P`` seconds of device time
  (``D`` decode output tok/s at the per-user target, ``P`` prefill tok/s), so the device serves
  ``(isl + osl) / (osl / D + isl / P)`` tokens/s.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from moetier.catalog import resolve_model
from moetier.errors import MoetierError
from moetier.planner.calibration import DEFAULT, Calibration
from moetier.planner.cluster import ClusterResult, Layout, batch_for_user_speed, plan_cluster
from moetier.planner.machines import get_machine

DATA = Path(__file__).resolve().parents[1] / "data" / "published"
METRICS = ("output tokens/s per device", "input tokens/s per device", "tokens/s per user",
           "total tokens/s per device (aggregated)")
_LAYOUT_KEYS = {"devices", "phase", "ep", "dp", "tp", "batch", "context", "cached_fraction", "redundant_experts",
                "imbalance", "two_batch_overlap", "dispatch_dtype", "combine_dtype", "kv_dtype", "attention_dtype",
                "mtp_tokens", "mtp_acceptance", "a2a", "routing_zipf"}


class PublishedError(MoetierError):
    """A published-figure file is malformed."""


@dataclass(frozen=True)
class Figure:
    id: str
    model: str
    machine: str
    precision: str
    regime: str
    metric: str
    value: float
    layout: tuple[tuple[str, Any], ...]
    target_tps_per_user: float | None = None
    aggregated: tuple[tuple[str, float], ...] = ()
    conditions: str = ""
    published: str = ""
    confidence: str = ""
    source: str = ""
    fabric: str = ""
    file: str = ""
    fit: bool = True  # False: reported and validated, but not used to fit (conditions inferred)

    @property
    def chip(self) -> str:
        return self.machine

    def layout_obj(self) -> Layout:
        kw = dict(self.layout)
        kw.setdefault("batch", 64.0)
        return Layout(**kw)


def _figure(d: Any, where: str, src: dict[str, Any]) -> Figure:
    if not isinstance(d, dict):
        raise PublishedError(f"{where}: expected an object, got {type(d).__name__}")
    for k in ("id", "model", "machine", "precision", "metric", "value", "layout"):
        if k not in d:
            raise PublishedError(f"{where}: missing key {k!r}")
    if d["metric"] not in METRICS:
        raise PublishedError(f"{where}.metric: {d['metric']!r} is not one of {', '.join(METRICS)}")
    v = d["value"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise PublishedError(f"{where}.value: expected a positive number, got {v!r}")
    lay = d["layout"]
    if not isinstance(lay, dict) or "devices" not in lay:
        raise PublishedError(f"{where}.layout: expected an object with 'devices'")
    bad = sorted(set(lay) - _LAYOUT_KEYS)
    if bad:
        raise PublishedError(f"{where}.layout: unknown key {bad[0]!r}; allowed: {', '.join(sorted(_LAYOUT_KEYS))}")
    for k, x in lay.items():
        if not isinstance(x, (int, float, str, bool)):
            raise PublishedError(f"{where}.layout.{k}: expected a number, string or boolean, got {x!r}")
    agg = d.get("aggregated") or {}
    if agg and (d["metric"] != METRICS[3] or set(agg) != {"isl", "osl", "prefill_batch"}):
        raise PublishedError(f"{where}.aggregated: needs isl, osl, prefill_batch and the aggregated metric")
    if d["metric"] in (METRICS[3],) and not agg:
        raise PublishedError(f"{where}: the aggregated metric needs an 'aggregated' object")
    tgt = d.get("target_tps_per_user")
    return Figure(
        id=str(d["id"]), model=str(d["model"]), machine=str(d["machine"]), precision=str(d["precision"]),
        regime=str(d.get("regime", "")), metric=d["metric"], value=float(v),
        layout=tuple(sorted(lay.items())), target_tps_per_user=None if tgt is None else float(tgt),
        aggregated=tuple(sorted((k, float(x)) for k, x in agg.items())),
        conditions=str(d.get("conditions", "")), published=str(d.get("published", "")),
        confidence=str(d.get("confidence", "")), source=str(src.get("source", "")),
        fabric=str(src.get("fabric", "")), file=where.split(":")[0], fit=bool(d.get("fit", True)),
    )


def load(directory: str | Path | None = None) -> tuple[Figure, ...]:
    """Every figure of every ``*.json`` file in ``directory`` (default: the shipped set)."""
    root = Path(directory) if directory is not None else DATA
    figs: list[Figure] = []
    for p in sorted(root.glob("*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PublishedError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("figures"), list):
            raise PublishedError(f"{p}: expected an object with a 'figures' list")
        for i, d in enumerate(doc["figures"]):
            figs.append(_figure(d, f"{p.name}: figures[{i}]", doc))
    ids = [f.id for f in figs]
    if len(set(ids)) != len(ids):
        raise PublishedError(f"{root}: duplicate figure ids")
    return tuple(figs)


@lru_cache(maxsize=16)
def _spec(name: str):
    return resolve_model(name)


@dataclass
class Prediction:
    figure: Figure
    value: float
    result: ClusterResult | None  # the decode (or only) plan
    prefill: ClusterResult | None = None  # aggregated figures: the prefill plan
    notes: list[str] = field(default_factory=list)

    @property
    def error(self) -> float:
        return self.value / self.figure.value - 1.0


def predict(fig: Figure, cal: Calibration | None = None) -> Prediction:
    """The planner's prediction of one figure, in the figure's metric."""
    cal = cal or DEFAULT
    spec = _spec(fig.model)
    machine = get_machine(fig.machine)
    lay = fig.layout_obj()
    if fig.target_tps_per_user is not None:
        r = batch_for_user_speed(spec, machine, lay, fig.target_tps_per_user, precision=fig.precision,
                                 calibration=cal)
        if r is None:  # even one request per device is too slow: report the one-request speed
            r = plan_cluster(spec, machine, replace(lay, batch=1.0), precision=fig.precision, calibration=cal)
            return Prediction(fig, 0.0 if fig.metric != "tokens/s per user" else r.tokens_per_s_per_user, r,
                              notes=["per-user target unreachable: predicted throughput 0"])
    else:
        r = plan_cluster(spec, machine, lay, precision=fig.precision, calibration=cal)
    if fig.metric == "tokens/s per user":
        return Prediction(fig, r.tokens_per_s_per_user, r)
    if fig.metric != METRICS[3]:
        return Prediction(fig, r.tokens_per_s_per_device, r)
    agg = dict(fig.aggregated)
    pre = plan_cluster(spec, machine, replace(lay, phase="prefill", batch=agg["prefill_batch"],
                                              context=agg["isl"], mtp_tokens=0),
                       precision=fig.precision, calibration=cal)
    d, p = r.tokens_per_s_per_device, pre.tokens_per_s_per_device
    v = (agg["isl"] + agg["osl"]) / (agg["osl"] / d + agg["isl"] / p)
    return Prediction(fig, v, r, prefill=pre)


def log_errors(figs: tuple[Figure, ...] | list[Figure], cal: Calibration) -> list[float]:
    out = []
    for f in figs:
        p = predict(f, cal)
        out.append(math.log(max(p.value, 1e-9) / f.value))
    return out


# grids of the fitted factors (round values); the fit is exhaustive over their product
GRID = {
    "overhead": (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.3, 2.6),
    "overlap": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    "floor_scale": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    "eplb_residual": (1.0, 1.1, 1.2, 1.3, 1.4),
}


def _loss(errs: list[float]) -> tuple[float, float]:
    a = [abs(e) for e in errs]
    return (max(a), sum(x * x for x in a) / len(a))


def _combos() -> list[tuple[float, ...]]:
    return list(itertools.product(*GRID.values()))


def _calibration(combo: tuple[float, ...], base: Calibration = DEFAULT) -> Calibration:
    return replace(base, **dict(zip(GRID, combo)))


def relevant_factors(fig: Figure) -> frozenset[str]:
    """The fitted factors that can change ``fig``'s prediction (the others are not read for it):
    ``overlap`` only with two-batch overlap, ``eplb_residual`` only when neither an imbalance nor
    a routing skew is given. (A test checks that the others leave the prediction unchanged.)"""
    lay = dict(fig.layout)
    out = {"overhead", "floor_scale"}
    if lay.get("two_batch_overlap", True):
        out.add("overlap")
    if lay.get("imbalance") is None and not lay.get("routing_zipf"):
        out.add("eplb_residual")
    return frozenset(out)


class ErrorTable:
    """log(predicted / published) of each figure at each grid point, computed once and shared.

    The in-sample fit and every leave-one-chip-out fit are minimisations over subsets of the
    same table, so validation costs one pass over the grid, and each fit is the global optimum
    on the grid (no start point that could carry information about a left-out chip). Factors a
    figure does not read are not varied for it (:func:`relevant_factors`).
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[Figure, tuple[float, ...]], float] = {}
        self._relevant: dict[Figure, tuple[bool, ...]] = {}

    def error(self, fig: Figure, combo: tuple[float, ...]) -> float:
        rel = self._relevant.get(fig)
        if rel is None:
            names = relevant_factors(fig)
            rel = self._relevant[fig] = tuple(k in names for k in GRID)
        combo = tuple(v if r else getattr(DEFAULT, k) for v, r, k in zip(combo, rel, GRID))
        key = (fig, combo)
        if key not in self._rows:
            p = predict(fig, _calibration(combo))
            self._rows[key] = math.log(max(p.value, 1e-9) / fig.value)
        return self._rows[key]


def fit(figs: tuple[Figure, ...] | list[Figure], table: ErrorTable | None = None) -> Calibration:
    """The grid point minimising the largest |log error| (then the mean square) over the fitted figures.

    Exhaustive over :data:`GRID` (ties broken by the grid order); figures marked ``fit: false``
    are ignored.
    """
    figs = [f for f in figs if f.fit]
    table = table or ErrorTable()
    best = min(_combos(), key=lambda c: _loss([table.error(f, c) for f in figs]))
    return replace(_calibration(best), name=f"fitted on {len(figs)} published figures")


@dataclass
class Validation:
    rows: list[dict[str, Any]]  # per figure: id, chip, in-sample error, LOCO error, LOCO calibration
    fitted: Calibration
    table: ErrorTable | None = None  # the grid errors behind the fits (reusable by further fits)

    def _abs(self, key: str) -> list[float]:
        return [abs(r[key]) for r in self.rows if r["fit"]]

    @property
    def in_sample_max(self) -> float:
        return max(self._abs("in_sample_error"))

    @property
    def in_sample_median(self) -> float:
        return statistics.median(self._abs("in_sample_error"))

    @property
    def loco_median(self) -> float:
        return statistics.median(self._abs("loco_error"))

    @property
    def loco_max(self) -> float:
        return max(self._abs("loco_error"))

    @property
    def loco_rms_log(self) -> float:
        """RMS of log(predicted / published) leaving each chip out (fitted figures; a 0 prediction counts as /100)."""
        logs = [math.log(max(1.0 + r["loco_error"], 0.01)) for r in self.rows if r["fit"]]
        return math.sqrt(statistics.fmean(x * x for x in logs))

    @property
    def n_fitted(self) -> int:
        return sum(1 for r in self.rows if r["fit"])


def validate(figs: tuple[Figure, ...] | None = None, cal: Calibration | None = None,
             table: ErrorTable | None = None) -> Validation:
    """In-sample errors with ``cal`` (default: the stored fit) and leave-one-chip-out errors.

    Each chip's figures are predicted with the factors :func:`fit` finds on the other chips'
    figures alone (the global grid optimum: nothing of the left-out chip enters).
    """
    figs = tuple(figs if figs is not None else load())
    cal = cal or DEFAULT
    table = table or ErrorTable()
    rows = []
    for chip in sorted({f.chip for f in figs}):
        rest = [f for f in figs if f.chip != chip]
        c_loco = fit(rest, table)
        for f in figs:
            if f.chip != chip:
                continue
            rows.append({"id": f.id, "chip": chip, "regime": f.regime, "published": f.value, "metric": f.metric,
                         "fit": f.fit,
                         "in_sample": predict(f, cal).value, "loco": predict(f, c_loco).value,
                         "loco_calibration": c_loco})
    for r in rows:
        r["in_sample_error"] = r["in_sample"] / r["published"] - 1
        r["loco_error"] = r["loco"] / r["published"] - 1
    order = {f.id: i for i, f in enumerate(figs)}
    rows.sort(key=lambda r: order[r["id"]])
    return Validation(rows, cal, table)


@lru_cache(maxsize=1)
def shipped_validation() -> Validation:
    """:func:`validate` of the shipped figures with the stored calibration, computed once per
    process (the model is deterministic; the CLI and the tests share it)."""
    return validate(load(), DEFAULT)


def markdown_table(val: Validation, figs: tuple[Figure, ...] | None = None) -> str:
    """The validation as the Markdown table of ``docs/cluster-planner.md`` (generated, not typed:
    a test checks the document holds exactly this text)."""
    figs = tuple(figs if figs is not None else load())
    by_id = {f.id: f for f in figs}
    out = ["| figure | chip | model | regime | published | predicted | error | LOCO | LOCO error |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in val.rows:
        f = by_id[r["id"]]
        name = f.id if f.fit else f"{f.id} (not fitted)"
        out.append(f"| {name} | {f.chip} | {f.model} | {f.regime} | {f.value:,.0f} | {r['in_sample']:,.0f} | "
                   f"{r['in_sample_error']:+.1%} | {r['loco']:,.0f} | {r['loco_error']:+.1%} |")
    out.append("")
    out.append(f"Over the {val.n_fitted} fitted figures: in-sample median |error| {val.in_sample_median:.1%}, "
               f"worst {val.in_sample_max:.1%}; leave-one-chip-out median {val.loco_median:.1%}, "
               f"worst {val.loco_max:.1%}.")
    return "\n".join(out)
