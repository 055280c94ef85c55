"""The few factors of the cluster planner that are FITTED to published measurements, stated once.

Everything chip- or fabric-specific is a cited fact in :mod:`moetier.planner.efficiency`
(GEMM efficiency by precision and tile, attention and memory efficiency, kernel floors,
link efficiency and latency floors). What no datasheet or microbenchmark gives is fitted here,
globally, for all chips at once, on the published figures of ``moetier/data/published/*.json``
(:mod:`moetier.planner.published` holds the fit and the leave-one-chip-out validation):

* ``overhead``: end-to-end compute time over the listed GEMM + attention time. It stands for
  the kernels the model does not list one by one (norms, RoPE, activation quantisation,
  routing / permutation, samplers) and for GEMMs below a lone GEMM's efficiency.
* ``overlap``: the fraction of min(local work, all-to-all) that two-batch overlap hides.
* ``floor_scale``: multiplies the per-kernel floor (a cited ~4 us); batch-1 latency depends
  on it and on little else.
* ``eplb_residual``: max/mean device load that EPLB leaves on real (in-distribution) traffic,
  used when no routing profile, Zipf skew or explicit imbalance is given. Figures measured with
  simulated perfectly balanced routing set ``imbalance 1`` and do not use it. (SGLang reports
  that EPLB speeds decode up 2.54x and that throughput tracks balancedness step by step; the
  residual is what is left.)

The values below are the result of ``published.fit(published.load())`` (the global optimum of
an exhaustive search over a grid of round values); ``tests/planner/test_published.py`` re-runs
the fit and checks it still lands here. ``LOCO_*`` are the leave-one-chip-out errors of that
fit: every cluster plan prints its prediction with the band they imply (see :func:`band`).

This module imports nothing from the cluster planner (no import circle).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """Fitted global factors (see module docstring)."""

    overhead: float
    overlap: float
    floor_scale: float
    eplb_residual: float = 1.0  # max/mean device load left after EPLB on real traffic
    name: str = ""

    def describe(self) -> str:
        return (f"{self.name}: non-GEMM overhead x{self.overhead:g} on compute, two-batch overlap "
                f"{self.overlap:g}, kernel floor x{self.floor_scale:g}, expert load after EPLB on real "
                f"traffic x{self.eplb_residual:g}")


# fitted (published.fit over all figures; see docs/cluster-planner.md "Validation")
DEFAULT = Calibration(overhead=1.6, overlap=0.8, floor_scale=2.0, eplb_residual=1.2,
                      name="fitted on the published figures")

# leave-one-chip-out errors of the fit above (published.validate over the 13 fitted figures):
# median and largest |error|. The printed band is +- the median (half the figures of a chip the
# fit never saw land inside it); the worst case is printed next to it.
LOCO_MEDIAN_ABS = 0.09
LOCO_MAX_ABS = 0.25  # GB200 NVFP4 decode, fitted without the GB200 figures
N_FIGURES = 13


def calibration_for(machine=None) -> Calibration:
    """The one fitted set (the same for every machine: chip differences are cited facts)."""
    return DEFAULT


def band(value: float, half_width: float = LOCO_MEDIAN_ABS) -> tuple[float, float]:
    """The uncertainty band around ``value``: x/÷ (1 + median leave-one-chip-out |error|)."""
    return value / (1.0 + half_width), value * (1.0 + half_width)
