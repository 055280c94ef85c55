"""Side-by-side results: summaries, ratios, targets, markdown table, README block, PNG plot.

Everything here is pure (dict in, dict/str out) except :func:`plot` and the file writers, so
the unit tests cover the arithmetic and the rendering without running any engine.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import median

ENGINE_LABELS = {
    "moetier": "moetier",
    "moetier_torch": "moetier, torch path (no native decode)",
    "llama_cpp": "llama.cpp (mmap)",
    "transformers": "transformers eager",
    "transformers_offload": "transformers + accelerate offload",
}
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
# the project's targets (issue 7): (scenario, peer, metric, minimum moetier/peer ratio)
RATIO_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("overcap", "llama_cpp", "decode", 2.0),
    ("overcap", "transformers_offload", "decode", 2.0),
    ("embedded", "llama_cpp", "decode", 0.8),
    ("ram", "llama_cpp", "decode", 0.8),
)
BOUND_TOLERANCE = 0.15  # moetier within 15% of the planner's bound


def summarize_engine(worker: Mapping[str, Any]) -> dict[str, Any]:
    """Medians of a worker's per-run rates (+ the raw runs), or the failure as reported."""
    out: dict[str, Any] = {k: v for k, v in worker.items() if k not in ("output_ids",)}
    if worker.get("status", "ok") != "ok":
        return out
    for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        runs = [float(x) for x in worker.get(f"{k}_runs", [])]
        out[k] = median(runs) if runs else None
        out[f"{k}_min"] = min(runs) if runs else None
        out[f"{k}_max"] = max(runs) if runs else None
    return out


def merge_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One engine's worker results from several interleaved rounds -> one record.

    Runs are concatenated (the median is over all of them); peaks are maxima; a failure in
    any round makes the record that failure."""
    if not rounds:
        return {"status": "failed", "error": "no run"}
    bad = [r for r in rounds if r.get("status", "ok") != "ok"]
    if bad:
        return {**bad[0], "rounds_ok": len(rounds) - len(bad)}
    out = dict(rounds[0])
    for k in ("prefill_tokens_per_s_runs", "decode_tokens_per_s_runs"):
        out[k] = [x for r in rounds for x in r.get(k, [])]
    for k in ("peak_rss_bytes", "cgroup_peak_bytes"):
        vals = [r[k] for r in rounds if r.get(k) is not None]
        out[k] = max(vals) if vals else None
    loads = [r["load_s"] for r in rounds if r.get("load_s") is not None]
    out["load_s"] = median(loads) if loads else None
    out["rounds"] = len(rounds)
    if len(rounds) > 1:
        out["loadavg_1min"] = [r.get("loadavg_1min") for r in rounds]
    return out


def round_ratios(rounds: Sequence[Mapping[str, Mapping[str, Any]]], base: str = "moetier") -> dict[str, list]:
    """moetier/peer decode-median ratio within each round (pairs measured back to back)."""
    out: dict[str, list] = {}
    for rd in rounds:
        m = rd.get(base)
        if not m or m.get("status", "ok") != "ok":
            continue
        for name, e in rd.items():
            if name == base or e.get("status", "ok") != "ok":
                continue
            out.setdefault(f"{base}/{name}", []).append(
                ratio(median(m.get("decode_tokens_per_s_runs", [])), median(e.get("decode_tokens_per_s_runs", []))))
    return out


def order_scenarios(scen: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """Scenarios in ``order`` (by base name), plain keys before their @variants."""
    pos = {n: i for i, n in enumerate(order)}
    return dict(sorted(scen.items(), key=lambda kv: (pos.get(kv[0].split("@")[0], len(pos)),
                                                     kv[0].count("@"), kv[0])))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (b > 0) or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def prefix_agreement(a: Sequence[int] | None, b: Sequence[int] | None) -> int | None:
    """Length of the common prefix of two greedy token streams (same checkpoint => same ids)."""
    if not a or not b:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pair_ratios(engines: Mapping[str, Mapping[str, Any]], base: str = "moetier") -> dict[str, dict[str, Any]]:
    """moetier / peer for prefill and decode medians, pair by pair (same run)."""
    m = engines.get(base)
    out: dict[str, dict[str, Any]] = {}
    if not m or m.get("status", "ok") != "ok":
        return out
    for name, e in engines.items():
        if name == base:
            continue
        ok = e.get("status", "ok") == "ok"
        out[f"{base}/{name}"] = {
            "prefill": ratio(m.get("prefill_tokens_per_s"), e.get("prefill_tokens_per_s")) if ok else None,
            "decode": ratio(m.get("decode_tokens_per_s"), e.get("decode_tokens_per_s")) if ok else None,
            "peer_status": e.get("status", "ok"),
        }
    return out


def evaluate_targets(name: str, sc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The project's targets that apply to scenario ``name``: value, threshold, pass."""
    res: list[dict[str, Any]] = []
    ratios = sc.get("ratios", {})
    for scen, peer, metric, thr in RATIO_TARGETS:
        if scen != name.split("@")[0]:
            continue
        r = ratios.get(f"moetier/{peer}", {})
        v = r.get(metric)
        if v is None and r.get("peer_status") not in (None, "ok"):
            # the peer could not run at all under the same cap: moetier wins by default
            res.append({"target": f"moetier {metric} >= {thr:g}x {ENGINE_LABELS.get(peer, peer)}",
                        "value": None, "threshold": thr, "pass": sc.get("engines", {}).get("moetier", {})
                        .get("status") == "ok", "note": f"peer {r.get('peer_status')}"})
            continue
        res.append({"target": f"moetier {metric} >= {thr:g}x {ENGINE_LABELS.get(peer, peer)}",
                    "value": v, "threshold": thr, "pass": None if v is None else v >= thr})
    fb = sc.get("moetier_vs_bound", {}).get("decode")
    res.append({"target": f"moetier decode within {BOUND_TOLERANCE:.0%} of the planner's bound",
                "value": fb, "threshold": 1 - BOUND_TOLERANCE,
                "pass": None if fb is None else fb >= 1 - BOUND_TOLERANCE})
    return res


def finish_scenario(name: str, sc: dict[str, Any]) -> dict[str, Any]:
    """Fill ratios, agreement, bound fractions and targets of a scenario from its engines."""
    eng = sc.get("engines", {})
    sc["ratios"] = pair_ratios(eng)
    m = eng.get("moetier", {})
    ref = m.get("output_ids_sample")
    sc["token_agreement"] = {n: prefix_agreement(ref, e.get("output_ids_sample")) for n, e in eng.items()
                             if n != "moetier"}
    pl = sc.get("planner") or {}
    sc["moetier_vs_bound"] = {
        "decode": ratio(m.get("decode_tokens_per_s"), pl.get("decode_tokens_per_s")),
        "prefill": ratio(m.get("prefill_tokens_per_s"), pl.get("prefill_tokens_per_s")),
    }
    sc["targets"] = evaluate_targets(name, sc)
    return sc


# ----------------------------------------------------------------------------- rendering


def _num(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render_markdown(payload: Mapping[str, Any]) -> str:
    """The results as markdown: one table per scenario, then the targets."""
    lines: list[str] = ["# moetier side by side", ""]
    prov = payload.get("provenance", {})
    mach = payload.get("machine", {})
    lines.append(f"Machine: {prov.get('cpu') or 'cpu'}, {prov.get('cores')} cores, "
                 f"{_gb(prov.get('ram_bytes'))} RAM; probe: memory read "
                 f"{_num((mach.get('memory_read_bw') or 0) / 1e9)} GB/s, disk read "
                 f"{_num((mach.get('disk_read_bw') or 0) / 1e9, 2)} GB/s. Versions: "
                 + ", ".join(f"{k} {v}" for k, v in {**prov.get("versions", {}),
                                                      **payload.get("peer_versions", {})}.items() if v)
                 + f". Date {prov.get('date', '?')}.")
    lines.append("Each engine in its own process and cgroup; greedy decoding of the same prompt token ids at batch 1; "
                 "one warm-up generation, then timed runs (medians); page cache dropped before each engine's "
                 "process; ratios are moetier/peer from the same run. "
                 "Cgroup peak counts only pages charged to the engine's group (file pages cached before it "
                 "started are not).")
    lines.append("")
    for name, sc in payload.get("scenarios", {}).items():
        cap = sc.get("cap_bytes")
        lines.append(f"## {sc.get('title', name)}")
        lines.append("")
        if sc.get("error") and not sc.get("model_dir"):
            lines += [f"Not run: {sc['error']}", ""]
            continue
        lines.append(f"Checkpoint `{sc.get('model_name', '?')}`: {_gb(sc.get('model_bytes'))} {sc.get('dtype')}, "
                     f"{sc.get('spec_summary', '')}; memory cap: "
                     + (_gb(cap) + " (cgroup v1, page cache included)" if cap else "none (in RAM)") + ".")
        if sc.get("error"):
            lines += ["", f"Not run: {sc['error']}", ""]
            continue
        pl = sc.get("planner") or {}
        ss = sc.get("settings")
        if ss:
            lines.append(f"Batch 1, {ss.get('prompt_tokens')} prompt tokens, {ss.get('decode_tokens')} decode tokens, "
                         f"median of {ss.get('runs')} runs x {ss.get('rounds', 1)} round(s) per engine.")
        lines.append("")
        lines.append("| engine | prefill tok/s | decode tok/s | moetier/peer decode | moetier/peer prefill "
                     "| peak RSS | cgroup peak | load s | status |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for en, e in sc.get("engines", {}).items():
            r = sc.get("ratios", {}).get(f"moetier/{en}", {})
            label = ENGINE_LABELS.get(en, en)
            if en == "moetier" and pl:
                label += (f" (bound: {_num(pl.get('prefill_tokens_per_s'))} / "
                          f"{_num(pl.get('decode_tokens_per_s'), 2)}, {pl.get('bottleneck')})")
            lines.append(f"| {label} | {_num(e.get('prefill_tokens_per_s'))} | {_num(e.get('decode_tokens_per_s'), 2)} "
                         f"| {_x(r.get('decode')) if en != 'moetier' else ''} "
                         f"| {_x(r.get('prefill')) if en != 'moetier' else ''} "
                         f"| {_gb(e.get('peak_rss_bytes'))} | {_gb(e.get('cgroup_peak_bytes'))} "
                         f"| {_num(e.get('load_s'), 1)} | {e.get('status', 'ok')} |")
        fb = sc.get("moetier_vs_bound", {})
        if pl:
            lines.append("")
            lines.append(f"Planner (`cpu` machine, {pl.get('precision')}): decode bound "
                         f"{_num(pl.get('decode_tokens_per_s'), 2)} tok/s, binds on **{pl.get('bottleneck')}**; "
                         f"prefill bound {_num(pl.get('prefill_tokens_per_s'))} tok/s "
                         f"({pl.get('prefill_bottleneck')}). "
                         f"moetier reaches {_x(fb.get('decode'))} of the decode bound, "
                         f"{_x(fb.get('prefill'))} of the prefill bound.")
        lines.append("")
        for t in sc.get("targets", []):
            mark = {True: "PASS", False: "MISS", None: "n/a"}[t.get("pass")]
            lines.append(f"- {mark}: {t['target']} (measured {_x(t.get('value'))}"
                         + (f", {t['note']}" if t.get("note") else "") + ")")
        for n in sc.get("notes", []):
            lines.append(f"- {n}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_readme_block(payload: Mapping[str, Any]) -> str:
    """A short results section for README.md (between the bench markers)."""
    prov = payload.get("provenance", {})
    mach = payload.get("machine", {})
    v = {**prov.get("versions", {}), **payload.get("peer_versions", {})}
    out = [README_BEGIN,
           "### Side by side (generated by `python -m bench report --readme`)",
           "",
           f"{prov.get('cpu') or 'CPU'}, {prov.get('cores')} cores, {_gb(prov.get('ram_bytes'))} RAM "
           f"(probe: {_num((mach.get('memory_read_bw') or 0) / 1e9)} GB/s memory, "
           f"{_num((mach.get('disk_read_bw') or 0) / 1e9, 2)} GB/s disk); moetier {v.get('moetier')}, "
           f"torch {v.get('torch')}, transformers {v.get('transformers')}, accelerate {v.get('accelerate')}, "
           f"llama-cpp-python {v.get('llama_cpp_python')}; {prov.get('date', '?')}. "
           "Batch-1 decode tok/s, medians; full tables in `bench/results/side_by_side.md`.",
           "",
           "| scenario | moetier decode | bound (binds on) | peers decode (moetier/peer) |",
           "|---|---:|---:|---|"]
    for name, sc in payload.get("scenarios", {}).items():
        if sc.get("error"):
            out.append(f"| {sc.get('title', name)} | not run | | {sc['error'][:80]} |")
            continue
        eng = sc.get("engines", {})
        m = eng.get("moetier", {})
        pl = sc.get("planner") or {}
        peers = "; ".join(
            f"{ENGINE_LABELS.get(n, n)} "
            f"{_num(e.get('decode_tokens_per_s'), 2) if e.get('status', 'ok') == 'ok' else e.get('status')}"
            f" ({_x(sc.get('ratios', {}).get(f'moetier/{n}', {}).get('decode'))})"
            for n, e in eng.items() if n != "moetier")
        out.append(f"| {sc.get('title', name)} | {_num(m.get('decode_tokens_per_s'), 2)} | "
                   f"{_num(pl.get('decode_tokens_per_s'), 2)} ({pl.get('bottleneck', '-')}) | {peers} |")
    out += ["", README_END]
    return "\n".join(out)


def replace_marked_block(text: str, block: str) -> str:
    """Replace the ``<!-- bench:begin -->...<!-- bench:end -->`` block (append one if absent)."""
    pat = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if pat.search(text):
        return pat.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def plot(payload: Mapping[str, Any], out: Path) -> Path | None:
    """Bar charts: prefill tok/s, decode tok/s, peak memory per engine, one group per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scen = [(n, s) for n, s in payload.get("scenarios", {}).items() if not s.get("error")]
    if not scen:
        return None
    engines = list(ENGINE_LABELS)
    colors = {"moetier": "#1f77b4", "moetier_torch": "#9467bd", "llama_cpp": "#ff7f0e", "transformers": "#2ca02c",
              "transformers_offload": "#d62728"}
    metrics = [("prefill_tokens_per_s", "prefill tok/s (log)", True),
               ("decode_tokens_per_s", "decode tok/s (log)", True),
               ("mem", "peak RSS GB (dots: cgroup peak)", False)]
    fig, axes = plt.subplots(1, 3, figsize=(max(15, 2.6 * len(scen) * 1.5), 5.2))
    width = 0.8 / len(engines)
    for ax, (key, title, log) in zip(axes, metrics):
        for j, en in enumerate(engines):
            xs, ys = [], []
            for i, (_, sc) in enumerate(scen):
                e = sc.get("engines", {}).get(en)
                if not e or e.get("status", "ok") != "ok":
                    continue
                x = i + (j - (len(engines) - 1) / 2) * width
                if key == "mem":
                    v = e.get("peak_rss_bytes")
                    v = v / 1e9 if v else None
                    if e.get("cgroup_peak_bytes"):
                        ax.plot([x], [e["cgroup_peak_bytes"] / 1e9], "k.", ms=6)
                else:
                    v = e.get(key)
                if v:
                    xs.append(x)
                    ys.append(v)
            if xs:
                ax.bar(xs, ys, width, label=ENGINE_LABELS[en], color=colors[en])
        if key == "decode_tokens_per_s":
            for i, (_, sc) in enumerate(scen):
                b = (sc.get("planner") or {}).get("decode_tokens_per_s")
                if b:
                    ax.hlines(b, i - 0.45, i + 0.45, colors="k", linestyles="--",
                              label="planner bound" if i == 0 else None)
        if key == "mem":
            for i, (_, sc) in enumerate(scen):
                if sc.get("cap_bytes"):
                    ax.hlines(sc["cap_bytes"] / 1e9, i - 0.45, i + 0.45, colors="r", linestyles=":",
                              label="memory cap" if i == 0 else None)
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels([sc.get("title", n).split(" ", 1)[0] + "\n" + n.replace("@", "\n@", 1) for n, sc in scen],
                           fontsize=8)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("moetier vs peers, batch 1, medians (same run, same checkpoint, same precision)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(payload: Mapping[str, Any], results_dir: Path, stem: str = "side_by_side") -> list[Path]:
    md = results_dir / f"{stem}.md"
    md.write_text(render_markdown(payload))
    outs = [md]
    png = plot(payload, results_dir / f"{stem}.png")
    if png:
        outs.append(png)
    return outs


def load_payload(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
