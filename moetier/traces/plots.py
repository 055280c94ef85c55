"""PNG plots of a routing trace (matplotlib, Agg backend; imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moetier.traces.format import Trace
from moetier.traces.simulate import layer_counts, sweep

DEFAULT_POLICIES = ("lru", "lfu", "lfu-decay", "adaptive", "static", "belady")


def _plt():
    from moetier.extras import require

    require("plot", "moetier trace stats --plot")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def load_heatmap(trace: Trace, path: str | Path) -> Path:
    """Layer x expert selection share (each layer row sums to 1)."""
    plt = _plt()
    counts = layer_counts(trace)
    layers = list(counts)
    mat = np.stack([counts[lyr] / max(counts[lyr].sum(), 1) for lyr in layers])
    fig, ax = plt.subplots(figsize=(max(6.0, trace.num_experts * 0.12), max(2.0, len(layers) * 0.35 + 1.2)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_title(f"{trace.model}: expert load (share of selections per layer)")
    fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def hit_rate_plot(trace: Trace, path: str | Path, policies: Sequence[str] = DEFAULT_POLICIES,
                  capacities: Sequence[int] | None = None) -> Path:
    """Overall hit rate vs per-layer cache size, one line per policy."""
    plt = _plt()
    n = trace.num_experts
    if capacities is None:
        step = max(1, n // 16)
        capacities = sorted({*range(step, n + 1, step), n})
    curves = sweep(trace, list(policies), list(capacities))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, ys in curves.items():
        ax.plot(capacities, ys, marker="o", markersize=3, label=name, linestyle="--" if name == "belady" else "-")
    ax.set_xlabel(f"cache size (experts per layer, of {n})")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{trace.model}: hit rate vs cache size")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def write_plots(trace: Trace, out_dir: str | Path) -> list[Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return [load_heatmap(trace, d / "load_heatmap.png"), hit_rate_plot(trace, d / "hit_rate_vs_cache.png")]
