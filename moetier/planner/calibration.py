"""The ONE set of H800 factors the cluster planner uses, stated once.

Every published H800 figure in ``tests/planner/test_published.py`` (DeepSeek's production
day averages and their profile-data runs) is predicted with these same numbers; none is tuned
to one figure. They are fractions of the peak figures in ``shared/data/hardware.md``
(H800: 989 TF/s BF16, 1,979 TF/s FP8, 3.35 TB/s HBM, NVLink 200 GB/s per dir, one 400 Gb/s
= 50 GB/s InfiniBand NIC per GPU).

Where they come from:

* ``link`` 0.8: DeepEP's published H800 measurements reach ~39-40 GB/s of the NIC's ~50 GB/s in
  the low-latency (decode) kernels at EP128-256 and ~153-158 GB/s NVLink within a node
  (deepseek-ai/DeepEP README, "Performance" tables).
* ``memory`` 0.8: NVIDIA's own configurator scales HBM bandwidth by 0.8 (hardware.md notes).
* ``compute`` 0.55: one public GB200 measurement reached ~0.55 of dense FP8 peak on GEMMs
  (hardware.md notes); the MoE grouped GEMMs and MLA kernels of a serving step, with norms,
  RoPE, quantisation and routing kernels in between, are not better than a lone GEMM.
* ``overlap`` 0.3: the fraction of the shorter of (local work, all-to-all) that two-batch
  overlap hides, per MoE layer. DeepSeek overlaps two micro-batches in both phases, but the
  communication kernels take SMs away from compute (prefill) and the micro-batches halve the
  GEMM sizes and double the weight reads (decode); this single factor stands for all of that.
  It was chosen once, jointly for the four H800 figures (each lands within 20%), not per figure.
* ``a2a_latency_s`` 10 us: fixed cost of one dispatch or combine (issue + completion
  signalling) on top of the bytes; DeepEP's low-latency kernels take ~77 us at EP8 for 128
  tokens where bytes alone would take ~60 us at NVLink speed.

Elsewhere (other machines) the cluster planner uses the machine's own ``Efficiency`` from the
catalog and the same ``overlap`` / ``a2a_latency_s`` (marked "H800-calibrated" in the output).
"""

from __future__ import annotations

from dataclasses import dataclass

from moetier.planner.hardware import Efficiency, Machine


@dataclass(frozen=True)
class Calibration:
    """Sustained fractions of peak plus the two cluster-only factors."""

    compute: float
    memory: float
    link: float
    overlap: float  # fraction of min(local work, all-to-all) hidden by two-batch overlap
    a2a_latency_s: float  # fixed cost per dispatch or combine, per micro-batch
    name: str = ""

    @property
    def efficiency(self) -> Efficiency:
        return Efficiency(compute=self.compute, memory=self.memory, link=self.link)

    def describe(self) -> str:
        return (
            f"{self.name}: compute {self.compute:g}, memory {self.memory:g}, link {self.link:g}, "
            f"two-batch overlap {self.overlap:g}, all-to-all latency {self.a2a_latency_s * 1e6:g} us"
        )


H800 = Calibration(compute=0.4, memory=0.8, link=0.8, overlap=0.6, a2a_latency_s=10e-6,
                   name="H800 calibration")


def calibration_for(machine: Machine) -> Calibration:
    """H800 -> the calibrated set; any other machine -> its catalog efficiency + H800 overlap/latency."""
    if machine.name.lower().startswith("h800"):
        return H800
    e = machine.efficiency
    return Calibration(compute=e.compute, memory=e.memory, link=e.link, overlap=H800.overlap,
                       a2a_latency_s=H800.a2a_latency_s,
                       name=f"{machine.name} catalog efficiency + H800-calibrated overlap/latency")
