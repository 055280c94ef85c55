"""Machine catalog, lookup and user override files.

``get_machine(name_or_path) -> Machine`` resolves, in order:

* a path to a ``.toml`` / ``.yaml`` / ``.yml`` / ``.json`` file describing a machine (or
  patching a built-in one with ``base = "h100"``), see :func:`load_machine_file`;
* ``cpu``: this computer, measured by ``moetier probe`` (cached, see ``planner/probe.py``);
* a built-in catalog name (``h100``, ``gb200``, ``mi300x``, ``tpu-v6e``, ``groq-lpu``, ...).

Catalog figures come from ``shared/data/hardware.md`` (dense figures; "per dir" = one
direction) with its confidence letter: ``R`` read in a vendor document, ``U`` unverified /
estimate. A figure the table leaves blank stays unknown here: the tier or field is left out
and a note says so. Host-side figures (host DRAM, PCIe) are not in hardware.md; where a
reference system publishes them they are added as an extra tier with confidence ``U`` and a
note giving the derivation, so the assumption is visible wherever the machine is printed.

Efficiency factors (sustained / peak) are per machine and printed wherever used. For the
accelerators: memory 0.8 (NVIDIA's configurator scales HBM bandwidth by 0.8; one public
GB200 measurement reached ~0.92), compute 0.6 (one GB200 GEMM measurement reached ~0.55 of
dense FP8 peak; 0.55-0.7 is the usual range), link 0.8. The measured ``cpu`` machine uses
1.0 everywhere because its figures are already sustained measurements.

Override file (TOML shown; YAML/JSON take the same keys)::

    name = "h100-pcie-host"          # required unless base is given
    base = "h100"                    # optional: start from a built-in (or cpu) and patch it
    confidence = "U"
    source = "my lab's measurements"
    compute_tier = "hbm"
    [flops]                          # precision -> dense FLOP/s; numbers or "989T"
    bf16 = 989e12
    [efficiency]
    compute = 0.6                    # memory, link
    [[tiers]]                        # a list REPLACES the tiers (nearest first) ...
    name = "hbm"
    capacity = "80GB"
    read_bw = "3.35TB/s"
    # [tiers.dram]                   # ... a table keyed by tier name PATCHES tiers by name;
    # capacity = "1TB"               #     a new name is appended as the farthest tier
    [[links]]
    name = "pcie"; src = "dram"; dst = "hbm"; bw = "64GB/s"

Sizes accept plain numbers (SI base units) or strings with units: ``80GB``, ``96GiB``,
``3.35TB/s``, ``989T`` (FLOP/s).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from moetier.errors import ConfigError, MoetierError
from moetier.planner.hardware import Efficiency, Link, Machine, MemoryTier

# --------------------------------------------------------------------------------------
# units

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BIN = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_QTY = re.compile(
    r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
    r"(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P|E)?\s*(B|b|FLOP|FLOPS|flop|flops|F)?\s*(/s|ps)?\s*$"
)


# examples of each kind of quantity, for error messages (each parser lists its own kind)
EXAMPLES = {
    "any": "'80GB', '96GiB', '3.35TB/s', '400Gb/s', '989T'",
    "size": "'8GB', '512MiB', '1.5e9'",
    "bandwidth": "'3.35TB/s', '400Gb/s', '50GB/s'",
    "flops": "'989T', '2.5e15'",
}


def parse_quantity(value: Any, what: str, kind: str = "any") -> float:
    """A number, or a string like ``80GB``, ``96GiB``, ``3.35TB/s``, ``400Gb/s``, ``989T``.

    Returns SI base units (bytes, bytes/s, FLOP/s). A lowercase ``b`` means bits (divided by
    8). ``what`` names the field in the error message; ``kind`` (a key of :data:`EXAMPLES`)
    picks the examples it shows.
    """
    ex = EXAMPLES.get(kind, EXAMPLES["any"])
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number or a quantity like {ex}, got {value!r}")
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        m = _QTY.match(value)
        if not m:
            raise ConfigError(f"{what}: cannot read {value!r}; expected a number or a quantity like {ex}")
        num, prefix, unit, _ = m.groups()
        v = float(num)
        if prefix:
            v *= _BIN[prefix] if prefix in _BIN else _PREFIX[prefix]
        if unit == "b":
            v /= 8.0
    else:
        raise ConfigError(f"{what}: expected a number or a quantity like {ex}, got {value!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{what}: must be finite, got {value!r}")
    return v


MIN_BARE_BYTES = 2**20  # a bare number below 1 MiB is never a byte count anyone means
SIZE_FORMS = "a size ('8GB', '512MiB'), a fraction ('0.25') or a percentage ('25%')"


class Size(NamedTuple):
    """What a size option said: exactly one of the three is set."""

    bytes: float | None = None
    fraction: float | None = None  # of the whole (the routed experts)
    count: int | None = None  # in the option's own unit (``count_unit``)


def parse_size(value: Any, what: str, *, allow_zero: bool = True, count_unit: str | None = None) -> Size:
    """The one rule for every cache / size option (``run --expert-cache``, ``plan --cache``,
    ``simulate --cache``, plan files).

    * a size with a unit (``8GB``, ``512MiB``, ``1.5G``) or a bare number >= 1 MiB: bytes;
    * a percentage (``25%``, up to 100%) or a bare number in (0, 1]: a fraction of the whole;
    * ``0``: nothing (unless ``allow_zero`` is False);
    * any other bare number is refused ("did you mean 2GB or a fraction?"), unless the option
      counts in its own unit (``count_unit``, e.g. simulate's "experts"): then a whole number
      is a count.
    """
    how = SIZE_FORMS if count_unit is None else f"a number of {count_unit} ('16'), {SIZE_FORMS}"
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{what}: expected {how}, got {value!r}")
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ConfigError(f"{what}: cannot read {value!r}; expected {how}") from None
        if not 0 <= pct <= 100 or (pct == 0 and not allow_zero):
            raise ConfigError(f"{what}: {value!r} is not a percentage in {'[0' if allow_zero else '(0'}, 100%]")
        return Size(fraction=pct / 100.0)
    bare = isinstance(value, (int, float)) or re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text)
    try:
        v = parse_quantity(value, what, "size")
    except ConfigError:
        raise ConfigError(f"{what}: cannot read {value!r}; expected {how}") from None
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{what}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    if v == 0:
        return Size(count=0) if count_unit is not None else Size(bytes=0.0)
    if not bare:
        m = _QTY.match(text)
        if m and (m.group(4) or m.group(3) not in (None, "B", "b")):
            raise ConfigError(f"{what}: {value!r} is not a size; expected {how}")
        if v < 1:
            raise ConfigError(f"{what}: {value!r} is less than one byte; expected {how}")
        return Size(bytes=v)
    if v <= 1:
        return Size(fraction=v)
    if count_unit is not None:
        if v != int(v):
            raise ConfigError(f"{what}: {value!r}: a number of {count_unit} must be whole; expected {how}")
        return Size(count=int(v))
    if v >= MIN_BARE_BYTES:
        return Size(bytes=v)
    raise ConfigError(f"{what}: a bare number is bytes, and {value!r} bytes is surely not meant: did you mean "
                      f"'{text}GB' or a fraction ('0.25', '25%')? Expected {SIZE_FORMS}")


def positive_quantity(value: Any, what: str) -> float:
    v = parse_quantity(value, what)
    if v <= 0:
        raise ConfigError(f"{what}: must be > 0, got {value!r}")
    return v


def fmt_si(value: float | None, unit: str = "", digits: int = 3) -> str:
    """``fmt_si(3.35e12, 'B/s') -> '3.35 TB/s'`` (decimal prefixes). None -> '-'."""
    if value is None:
        return "-"
    if value == 0:
        return f"0 {unit}".strip()
    if math.isinf(value):
        return "inf"
    a = abs(value)
    for p, s in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= s:
            return f"{value / s:.{digits}g} {p}{unit}".strip()
    if a >= 1:
        return f"{value:.{digits}g} {unit}".strip()
    for p, s in (("m", 1e-3), ("u", 1e-6), ("n", 1e-9)):
        if a >= s:
            return f"{value / s:.{digits}g} {p}{unit}".strip()
    return f"{value:.{digits}g} {unit}".strip()


def fmt_bytes(b: float | None) -> str:
    return fmt_si(b, "B")


def fmt_seconds(s: float | None) -> str:
    if s is not None and 1 <= s < 1e6:
        return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"
    return fmt_si(s, "s")


def fmt_tokens_per_s(v: float | None) -> str:
    """Throughput for display; no milli-prefix below 1 tok/s."""
    if v is not None and 0 < v < 1:
        return f"{v:.3g} tok/s"
    return fmt_si(v, "tok/s")


# --------------------------------------------------------------------------------------
# catalog

GB, TB, GiB, MB, MiB = 1e9, 1e12, 2.0**30, 1e6, 2.0**20
T = 1e12
HW = "shared/data/hardware.md"
ACCEL_EFF = Efficiency(compute=0.6, memory=0.8, link=0.8)
EFF_NOTE = (
    "efficiency: compute 0.6 (GB200 GEMM measured ~0.55 of dense FP8 peak; 0.55-0.7 usual), "
    "memory 0.8 (NVIDIA configurator scaling), link 0.8 (assumed)"
)
# PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b encoding -> ~63 GB/s per direction (PCI-SIG).
PCIE5_X16 = 32e9 * 16 * 128 / 130 / 8
PCIE_NOTE = "host link: PCIe 5.0 x16 ~63 GB/s per dir (PCI-SIG 32 GT/s, 128b/130b), U"


def _hbm(cap: float, bw: float) -> MemoryTier:
    return MemoryTier("hbm", cap, bw)


def _nv_hopper(name: str, conf: str, scale_up: float, scale_out: float | None, hbm: MemoryTier,
               extra: tuple[str, ...] = ()) -> Machine:
    # DGX H100 / H200 host: 2 TB DDR5 system memory; 2x Xeon Platinum 8480C, 8 channels of
    # DDR5-4800 each -> 2 x 307 GB/s peak. Both from NVIDIA's DGX H100 datasheet + Intel ark;
    # not in hardware.md, hence U. The GPU reaches it over PCIe 5.0 x16.
    host = MemoryTier("dram", 2 * TB, 2 * 8 * 4800e6 * 8)
    return Machine(
        name=name,
        tiers=(hbm, host),
        flops={"bf16": 989 * T, "fp16": 989 * T, "fp8": 1979 * T, "int8": 1979 * T},
        links=(Link("pcie", "dram", "hbm", PCIE5_X16),),
        efficiency=ACCEL_EFF,
        compute_tier="hbm",
        scale_up_bw=scale_up,
        scale_up_domain=8,
        scale_out_bw=scale_out,
        devices_per_node=8,
        confidence=conf,
        source=HW,
        notes=(
            "50 MB L2 (bandwidth unknown: not modelled as a weight tier)",
            "dram tier = DGX host, 2 TB DDR5, 2 sockets x 8 ch DDR5-4800 = 614 GB/s peak (U, "
            "DGX datasheet; shared by the node's 8 GPUs)",
            PCIE_NOTE,
            "scale-up domain 8 = HGX baseboard (R)",
            EFF_NOTE,
            *extra,
        ),
    )


def _catalog() -> dict[str, Machine]:
    m: dict[str, Machine] = {}
    m["h100"] = _nv_hopper("h100", "R", 450 * GB, 50 * GB, _hbm(80 * GB, 3.35 * TB),
                           ("NVIDIA H100 SXM; NVLink4 450 GB/s per dir; 400 Gb/s NIC",))
    m["h800"] = _nv_hopper("h800", "U", 200 * GB, 50 * GB, _hbm(80 * GB, 3.35 * TB),
                           ("NVIDIA H800 SXM; NVLink 200 GB/s per dir (export-limited)",))
    m["h200"] = _nv_hopper("h200", "R", 450 * GB, 50 * GB, _hbm(141 * GB, 4.8 * TB),
                           ("NVIDIA H200: 141 GB HBM3e",))
    # DGX B200: 2x Xeon Platinum 8570, 2 TB DDR5 (datasheet: up to 4 TB). U.
    m["b200"] = Machine(
        name="b200",
        tiers=(_hbm(180 * GB, 7.7 * TB), MemoryTier("dram", 2 * TB, 2 * 8 * 5600e6 * 8)),
        flops={"bf16": 2250 * T, "fp16": 2250 * T, "fp8": 4500 * T, "int8": 4500 * T, "fp4": 9000 * T},
        links=(Link("pcie", "dram", "hbm", PCIE5_X16),),
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=900 * GB, scale_up_domain=8, scale_out_bw=100 * GB, devices_per_node=8,
        confidence="R", source=HW,
        notes=("NVIDIA B200 (HGX); NVLink5 900 GB/s per dir; 800G NIC",
               "dram tier = DGX B200 host, 2 TB DDR5-5600, 2 sockets x 8 ch = 717 GB/s peak (U)",
               PCIE_NOTE, "on-chip cache: unknown", EFF_NOTE),
    )
    for name, fp4, hbm_cap in (("gb200", 10000, 186 * GB), ("gb300", 15000, 288 * GB)):
        # Grace: up to 480 GB LPDDR5X at up to 512 GB/s, NVLink-C2C 900 GB/s bidirectional
        # (450 per dir), one Grace per two GPUs (NVIDIA Grace / GB200 datasheets). U here.
        m[name] = Machine(
            name=name,
            tiers=(_hbm(hbm_cap, 8 * TB), MemoryTier("dram", 480 * GB, 512 * GB)),
            flops={"bf16": 2500 * T, "fp16": 2500 * T, "fp8": 5000 * T, "int8": 5000 * T, "fp4": fp4 * T},
            links=(Link("nvlink-c2c", "dram", "hbm", 450 * GB),),
            efficiency=ACCEL_EFF, compute_tier="hbm",
            scale_up_bw=900 * GB, scale_up_domain=72, scale_out_bw=100 * GB, devices_per_node=4,
            confidence="R", source=HW,
            notes=(f"NVIDIA {name.upper()} per GPU; NVL72 rack = 72 GPUs",
                   "dram tier = Grace LPDDR5X up to 480 GB at up to 512 GB/s, shared by 2 GPUs (U)",
                   "host link NVLink-C2C 900 GB/s bidirectional = 450 GB/s per dir (U)",
                   "on-chip cache: unknown", EFF_NOTE),
        )
    m["mi300x"] = Machine(
        name="mi300x",
        tiers=(_hbm(192 * GB, 5.3 * TB),),
        flops={"bf16": 1307 * T, "fp16": 1307 * T, "fp8": 2615 * T, "int8": 2615 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=448 * GB, scale_up_domain=8, scale_out_bw=50 * GB, devices_per_node=8,
        confidence="U", source=HW,
        notes=("AMD MI300X; 256 MB Infinity Cache (bandwidth unknown: not a weight tier)",
               "Infinity Fabric 896 GB/s aggregate, taken as 448 GB/s per dir (U)",
               "host memory: server-dependent, unknown (add a dram tier with --machine FILE)",
               EFF_NOTE),
    )
    m["mi355x"] = Machine(
        name="mi355x",
        tiers=(_hbm(288 * GB, 8 * TB),),
        flops={"bf16": 2500 * T, "fp16": 2500 * T, "fp8": 5000 * T, "fp4": 10000 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_out_bw=50 * GB, confidence="U", source=HW,
        notes=("AMD MI355X; compute figures approximate (~)", "scale-up bandwidth: unknown",
               "host memory: unknown", EFF_NOTE),
    )
    m["trainium2"] = Machine(
        name="trainium2",
        tiers=(_hbm(96 * GiB, 2.9 * TB),),
        flops={"bf16": 667 * T, "fp8": 1299 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=640 * GB, confidence="R", source=HW,
        notes=("AWS Trainium2; 8 x 28 MB on-chip SRAM (bandwidth unknown: not a weight tier)",
               "NeuronLink-v3 1.28 TB/s, direction not stated: taken as 640 GB/s per dir (U)",
               "scale-out: EFA, bandwidth unknown", EFF_NOTE),
    )
    m["trainium3"] = Machine(
        name="trainium3",
        tiers=(_hbm(144 * GB, 4.9 * TB),),
        flops={"bf16": 671 * T, "fp8": 2517 * T, "fp4": 2517 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=1280 * GB, scale_up_domain=144, confidence="R", source=HW,
        notes=("AWS Trainium3; FP8/FP4 are MXFP8/MXFP4 (no FP4 speed-up over FP8)",
               "8 x 32 MiB on-chip SRAM (bandwidth unknown: not a weight tier)",
               "NeuronLink-v4 2.56 TB/s, direction not stated: taken as 1.28 TB/s per dir (U)",
               "Trn3 UltraServer = 144 chips; chip-to-chip latency just under 10 us", EFF_NOTE),
    )
    m["tpu-v5p"] = Machine(
        name="tpu-v5p",
        tiers=(_hbm(95 * GiB, 2.765 * TB),),
        flops={"bf16": 459 * T, "fp8": 459 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=600 * GB, confidence="R", source=HW,
        notes=("Google TPU v5p; ICI 1.2 TB/s bidirectional = 600 GB/s per dir", EFF_NOTE),
    )
    m["tpu-v6e"] = Machine(
        name="tpu-v6e",
        tiers=(_hbm(32 * GB, 1.638 * TB),),
        flops={"bf16": 918 * T, "int8": 1836 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=400 * GB, confidence="R", source=HW,
        notes=("Google TPU v6e (Trillium); ICI 800 GB/s bidirectional = 400 GB/s per dir", EFF_NOTE),
    )
    m["tpu7x"] = Machine(
        name="tpu7x",
        tiers=(_hbm(192 * GiB, 7.4 * TB),),
        flops={"bf16": 2307 * T, "fp8": 4614 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=600 * GB, confidence="U", source=HW,
        notes=("Google TPU7x Ironwood: compute and HBM size R; bandwidths U (~7.4 TB/s HBM)",
               "ICI ~1.2 TB/s taken as bidirectional = 600 GB/s per dir (U)", EFF_NOTE),
    )
    m["ascend-910c"] = Machine(
        name="ascend-910c",
        tiers=(_hbm(128 * GB, 3.2 * TB),),
        flops={"bf16": 752 * T, "int8": 1504 * T},
        efficiency=ACCEL_EFF, compute_tier="hbm",
        scale_up_bw=392 * GB, scale_up_domain=384, scale_out_bw=50 * GB, confidence="U", source=HW,
        notes=("Huawei Ascend 910C; BF16 ~752-780 TF/s (low end used)",
               "INT8 ~1,504 TOPS (U): the CloudMatrix384 paper's 1,943 tok/s/NPU = 1.29 tok/s per TFLOPS "
               "and 6,688 = 4.45 per TFLOPS both imply ~1,505 TFLOPS per chip (2 dies) = 2x BF16",
               "UB >= 392 GB/s per dir; CloudMatrix 384 = 384 chips",
               "400 Gb/s RDMA scale-out", EFF_NOTE),
    )
    m["groq-lpu"] = Machine(
        name="groq-lpu",
        tiers=(MemoryTier("sram", 230 * MB, 80 * TB),),
        flops={"fp16": 188 * T, "int8": 750 * T},
        efficiency=ACCEL_EFF, compute_tier="sram",
        confidence="U", source=HW,
        notes=("Groq LPU: no HBM; 230 MB SRAM at 80 TB/s; FP16 188 TF/s, INT8 750 TOPS",
               "chip-to-chip bandwidth unknown; models larger than 230 MB need many chips "
               "(cluster planner)", EFF_NOTE),
    )
    m["cerebras-wse3"] = Machine(
        name="cerebras-wse3",
        tiers=(MemoryTier("sram", 44 * GB, 21e15),),
        flops={},
        efficiency=ACCEL_EFF, compute_tier="sram",
        confidence="U", source=HW,
        notes=("Cerebras WSE-3: 44 GB SRAM at 21 PB/s; external MemoryX (capacity/bandwidth "
               "unknown, not modelled)",
               "dense compute figure unknown: give one with --what-if flops=VALUE or a machine file",
               EFF_NOTE),
    )
    return m


CATALOG: dict[str, Machine] = _catalog()
ALIASES = {
    "h100-sxm": "h100", "h800-sxm": "h800", "trn2": "trainium2", "trn3": "trainium3",
    "v5p": "tpu-v5p", "v6e": "tpu-v6e", "tpu-v6e-trillium": "tpu-v6e", "ironwood": "tpu7x",
    "tpu-7x": "tpu7x", "910c": "ascend-910c", "groq": "groq-lpu", "lpu": "groq-lpu",
    "wse-3": "cerebras-wse3", "wse3": "cerebras-wse3", "cerebras": "cerebras-wse3",
}


def names() -> list[str]:
    """Known machine names: the catalog plus ``cpu`` (measured)."""
    return [*CATALOG, "cpu"]


def get_machine(name_or_path: str | Path | Machine, *, refresh_probe: bool = False) -> Machine:
    """A built-in name, ``cpu`` (measured by the probe, cached), or a machine file path."""
    if isinstance(name_or_path, Machine):
        return name_or_path
    text = str(name_or_path)
    p = Path(text)
    if p.suffix.lower() in (".toml", ".yaml", ".yml", ".json") or p.is_file():
        return load_machine_file(p)
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    if key == "cpu":
        from moetier.planner import probe

        return probe.cpu_machine(refresh=refresh_probe)
    if key in CATALOG:
        return CATALOG[key]
    raise ConfigError(
        f"machine {text!r}: unknown; known machines: {', '.join(names())} "
        "(or a path to a .toml/.yaml machine file)"
    )


# --------------------------------------------------------------------------------------
# override files

_TOP_KEYS = {"name", "base", "confidence", "source", "notes", "compute_tier", "flops", "efficiency",
             "tiers", "links", "scale_up_bw", "scale_up_domain", "scale_out_bw", "devices_per_node"}
_TIER_KEYS = {"name", "capacity", "capacity_bytes", "read_bw", "latency_s", "write_bw", "compute_flops"}
_LINK_KEYS = {"name", "src", "dst", "bw", "latency_s"}
_EFF_KEYS = {"compute", "memory", "link"}


def _read_mapping(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such machine file (expected .toml, .yaml or .json)")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # every parser error becomes one user message
        raise ConfigError(f"{path}: cannot parse machine file ({type(e).__name__}: {e})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a table/mapping at top level, got {type(data).__name__}")
    return data


def _check_keys(d: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a table/mapping, got {d!r}")
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    return d


def _tier_from(d: Any, where: str, base: MemoryTier | None = None) -> MemoryTier:
    d = _check_keys(d, _TIER_KEYS, where)
    name = d.get("name", base.name if base else None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: missing (expected a tier name like 'hbm')")
    cap_raw = d.get("capacity", d.get("capacity_bytes"))
    if cap_raw is None and base is None:
        raise ConfigError(f"{where}.capacity: missing (expected bytes, e.g. '80GB')")
    if d.get("read_bw") is None and base is None:
        raise ConfigError(f"{where}.read_bw: missing (expected bytes/s, e.g. '3.35TB/s')")
    cap = positive_quantity(cap_raw, f"{where}.capacity") if cap_raw is not None else base.capacity_bytes
    bw = positive_quantity(d["read_bw"], f"{where}.read_bw") if "read_bw" in d else base.read_bw
    out = MemoryTier(name, cap, bw) if base is None else replace(base, name=name, capacity_bytes=cap,
                                                                  read_bw=bw)
    if "latency_s" in d:
        lat = parse_quantity(d["latency_s"], f"{where}.latency_s")
        if lat < 0:
            raise ConfigError(f"{where}.latency_s: must be >= 0, got {d['latency_s']!r}")
        out = replace(out, latency_s=lat)
    if "write_bw" in d:
        out = replace(out, write_bw=positive_quantity(d["write_bw"], f"{where}.write_bw"))
    if "compute_flops" in d:
        out = replace(out, compute_flops=positive_quantity(d["compute_flops"], f"{where}.compute_flops"))
    return out


def machine_from_mapping(data: Mapping[str, Any], source: str = "machine file") -> Machine:
    """Build (or patch) a Machine from a parsed override mapping; errors name the key."""
    _check_keys(data, _TOP_KEYS, source)
    base: Machine | None = None
    if "base" in data:
        if not isinstance(data["base"], str):
            raise ConfigError(f"{source}: key 'base' must be a machine name, got {data['base']!r}")
        try:
            base = get_machine(data["base"])
        except MoetierError as e:
            raise ConfigError(f"{source}: key 'base': {e}") from None
    name = data.get("name", f"{base.name}+{Path(source).stem}" if base else None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: key 'name' is missing (expected a string) and no 'base' is given")

    # tiers
    tiers: list[MemoryTier] = list(base.tiers) if base else []
    if "tiers" in data:
        raw = data["tiers"]
        if isinstance(raw, list):
            tiers = [_tier_from(t, f"{source}: tiers[{i}]") for i, t in enumerate(raw)]
        elif isinstance(raw, Mapping):
            for tname, patch in raw.items():
                where = f"{source}: tiers.{tname}"
                if not isinstance(patch, Mapping):
                    raise ConfigError(f"{where}: expected a table, got {patch!r}")
                patch = {**patch, "name": patch.get("name", tname)}
                idx = next((i for i, t in enumerate(tiers) if t.name == tname), None)
                if idx is None:
                    tiers.append(_tier_from(patch, where))
                else:
                    tiers[idx] = _tier_from(patch, where, base=tiers[idx])
        else:
            raise ConfigError(f"{source}: key 'tiers' must be a list of tables or a table keyed by tier name")
    if not tiers:
        raise ConfigError(f"{source}: key 'tiers' is missing (expected at least one memory tier)")
    tier_names = [t.name for t in tiers]
    if len(set(tier_names)) != len(tier_names):
        raise ConfigError(f"{source}: key 'tiers': duplicate tier names {tier_names}")

    # flops
    flops: dict[str, float] = dict(base.flops) if base else {}
    if "flops" in data:
        fl = data["flops"]
        if not isinstance(fl, Mapping):
            raise ConfigError(f"{source}: key 'flops' must be a table precision -> FLOP/s, got {fl!r}")
        for prec, v in fl.items():
            flops[str(prec)] = positive_quantity(v, f"{source}: flops.{prec}")

    eff = base.efficiency if base else Efficiency()
    if "efficiency" in data:
        e = _check_keys(data["efficiency"], _EFF_KEYS, f"{source}: efficiency")
        vals = {}
        for k, v in e.items():
            x = parse_quantity(v, f"{source}: efficiency.{k}")
            if not 0 < x <= 1:
                raise ConfigError(f"{source}: efficiency.{k}: must be in (0, 1], got {v!r}")
            vals[k] = x
        eff = replace(eff, **vals)

    links = list(base.links) if base else []
    if "links" in data:
        if not isinstance(data["links"], list):
            raise ConfigError(f"{source}: key 'links' must be a list of tables")
        links = []
        for i, lk in enumerate(data["links"]):
            where = f"{source}: links[{i}]"
            lk = _check_keys(lk, _LINK_KEYS, where)
            for k in ("name", "src", "dst", "bw"):
                if k not in lk:
                    raise ConfigError(f"{where}.{k}: missing")
            links.append(Link(str(lk["name"]), str(lk["src"]), str(lk["dst"]),
                              positive_quantity(lk["bw"], f"{where}.bw"),
                              parse_quantity(lk.get("latency_s", 0.0), f"{where}.latency_s")))

    compute_tier = data.get("compute_tier", base.compute_tier if base else "")
    if compute_tier and compute_tier not in tier_names:
        raise ConfigError(f"{source}: key 'compute_tier' {compute_tier!r} is not a tier; tiers: {tier_names}")

    kw: dict[str, Any] = {}
    for k in ("scale_up_bw", "scale_out_bw"):
        if k in data:
            kw[k] = positive_quantity(data[k], f"{source}: {k}")
    for k in ("scale_up_domain", "devices_per_node"):
        if k in data:
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{source}: key {k!r} must be a positive integer, got {v!r}")
            kw[k] = v
    conf = data.get("confidence", "U")
    if conf not in ("R", "U", "M"):
        raise ConfigError(f"{source}: key 'confidence' must be R, U or M, got {conf!r}")
    notes = data.get("notes", [])
    if isinstance(notes, str):
        notes = [notes]
    if not isinstance(notes, list):
        raise ConfigError(f"{source}: key 'notes' must be a list of strings")
    base_notes = tuple(base.notes) if base else ()
    src = str(data.get("source", source))
    if base is not None:
        src = f"{src} (patching {base.name}: {base.source})"
        kw = {**{f.name: getattr(base, f.name) for f in fields(Machine)
                 if f.name in ("scale_up_bw", "scale_up_domain", "scale_out_bw", "devices_per_node")}, **kw}
    return Machine(
        name=name, tiers=tuple(tiers), flops=flops, links=tuple(links), efficiency=eff,
        compute_tier=compute_tier or "", confidence=conf, source=src,
        notes=(*base_notes, *map(str, notes)), **kw,
    )


def load_machine_file(path: str | Path) -> Machine:
    """Read a ``.toml`` / ``.yaml`` / ``.json`` machine description (see module docstring)."""
    p = Path(path)
    return machine_from_mapping(_read_mapping(p), source=str(p))


# --------------------------------------------------------------------------------------
# display


def machine_to_dict(m: Machine) -> dict[str, Any]:
    """JSON-ready view (SI units)."""
    d = asdict(m)
    d["flops"] = dict(m.flops)
    d["compute_tier"] = m.compute_tier_name
    return d


def describe(m: Machine) -> list[str]:
    """Human lines: tiers, compute, links, efficiency, confidence, notes."""
    lines = [f"{m.name}  (confidence {m.confidence}; source: {m.source or '-'})"]
    for t in m.tiers:
        mark = "  <- compute" if t.name == m.compute_tier_name else ""
        extra = f", in-place compute {fmt_si(t.compute_flops, 'FLOP/s')}" if t.compute_flops else ""
        lines.append(f"  tier {t.name:6s} {fmt_bytes(t.capacity_bytes):>10s}  {fmt_si(t.read_bw, 'B/s'):>11s}"
                     f"{extra}{mark}")
    fl = ", ".join(f"{k} {fmt_si(v, 'FLOP/s')}" for k, v in m.flops.items()) or "unknown"
    lines.append(f"  compute: {fl}")
    for lk in m.links:
        lines.append(f"  link {lk.name}: {lk.src} <-> {lk.dst} {fmt_si(lk.bw, 'B/s')} per dir")
    if m.scale_up_bw or m.scale_out_bw:
        lines.append(f"  scale-up {fmt_si(m.scale_up_bw, 'B/s')} per dir (domain {m.scale_up_domain or '?'}), "
                     f"scale-out {fmt_si(m.scale_out_bw, 'B/s')}")
    e = m.efficiency
    lines.append(f"  efficiency: compute {e.compute:g}, memory {e.memory:g}, link {e.link:g}")
    for n in m.notes:
        lines.append(f"  note: {n}")
    return lines
