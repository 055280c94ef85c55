"""PlacementPlan: where every weight of a model lives in the weight hierarchy.

Three tiers, nearest first:

* ``resident`` — loaded once at start and never evicted. The always-on set (embedding, LM
  head, attention, norms, routers, dense FFNs, shared experts) is always resident; routed
  experts may be pinned resident too.
* ``cache`` — a fixed pool of routed-expert slots (``cache_bytes``; global or per layer),
  filled and evicted by a policy from :mod:`moetier.weights.policies`.
* ``store`` — the safetensors files on disk, read one expert at a time into a free slot.

A plan is one immutable object passed down to the loader and the expert provider; nothing
reads a global. It is built by :func:`default_plan` from a RAM budget, or parsed from a
declarative YAML/JSON file with structured selectors (never regexes over module names)::

    max_ram: 3G                  # resident + cache + KV cache + activations
    expert_cache: 1.5G           # or a fraction of the routed set: 0.25
    cache_scope: global          # or per_layer
    policy: {name: adaptive}     # any name from moetier.weights.policies
    prefetch: {enabled: true, max_inflight_bytes: 256M}
    rules:                       # later rules override earlier ones
      - {kind: routed_experts, layers: 0-29, tier: cache}
      - {kind: routed_experts, layers: 30-47, experts: 0-7, tier: resident}

Device tiers (GPU HBM above host RAM) fit the same shape later: another tier name in
``TIERS`` and a provider for it; the policy code does not change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetier.errors import ConfigError
from moetier.planner.census import ALWAYS_ON_GROUPS, GROUPS
from moetier.planner.machines import _QTY, EXAMPLES, MIN_BARE_BYTES, parse_quantity, parse_size
from moetier.spec import ModelSpec

TIERS = ("resident", "cache", "store")
KINDS = GROUPS  # the census groups: one vocabulary for census, planner and placement
ALWAYS_ON_KINDS = frozenset(ALWAYS_ON_GROUPS)
CACHE_SCOPES = ("global", "per_layer")

def parse_bytes(value: Any, what: str = "size") -> int:
    """``"3G"``, ``"512MiB"``, ``"1.5e9"`` or a bare number of at least 1 MiB -> bytes (int).

    The size rule of :func:`moetier.planner.machines.parse_size` without fractions: a bare
    number below 1 MiB (``--max-ram 600``) is refused, naming the unit it needs."""
    n = parse_quantity(value, what, "size")
    if n <= 0:
        raise ConfigError(f"{what}: must be > 0, got {value!r}")
    m = _QTY.match(str(value))
    if m and (m.group(4) or m.group(3) not in (None, "B", "b")):
        raise ConfigError(f"{what}: {value!r} is not a size; expected a size like {EXAMPLES['size']}")
    bare = isinstance(value, (int, float)) or (m is not None and not m.group(2) and not m.group(3))
    if bare and n < MIN_BARE_BYTES:
        raise ConfigError(f"{what}: a bare number is bytes, and {value!r} bytes is surely not meant; "
                          f"write the unit, e.g. '{value}MB' or '{value}GB'")
    return int(n)


def parse_cache_option(value: Any, what: str) -> tuple[int | None, float | None]:
    """An expert-cache size (``--expert-cache``, a plan file's ``expert_cache``) by the one
    size rule (:func:`moetier.planner.machines.parse_size`): ``(bytes, None)`` or
    ``(None, fraction of the routed experts)``."""
    size = parse_size(value, what)
    return (None if size.bytes is None else int(size.bytes)), size.fraction


def _parse_range(value: Any, what: str, upper: int) -> frozenset[int]:
    """``"0-29"``, ``"0-3,8,10-11"``, ``5`` or ``[1, 2]`` -> a set of ints in [0, upper)."""
    out: set[int] = set()
    items: list[Any]
    if isinstance(value, bool):
        items = [value]
    elif isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    for it in items:
        if isinstance(it, bool):
            raise ConfigError(f"{what}: expected integers or ranges like 0-29, got {it!r}")
        if isinstance(it, int):
            lo = hi = it
        elif isinstance(it, str) and re.fullmatch(r"\d+", it):
            lo = hi = int(it)
        elif isinstance(it, str) and re.fullmatch(r"\d+\s*-\s*\d+", it):
            lo, hi = (int(x) for x in it.split("-"))
        else:
            raise ConfigError(f"{what}: expected integers or ranges like 0-29, got {it!r}")
        if lo > hi or lo < 0 or hi >= upper:
            raise ConfigError(f"{what}: range {it!r} is outside 0-{upper - 1}")
        out.update(range(lo, hi + 1))
    return frozenset(out)


@dataclass(frozen=True)
class Selector:
    """Which weights a rule applies to. ``None`` means any."""

    kind: str | None = None
    layers: frozenset[int] | None = None
    experts: frozenset[int] | None = None

    def matches(self, kind: str, layer: int | None, expert: int | None) -> bool:
        if self.kind is not None and self.kind != kind:
            return False
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        if self.experts is not None and (expert is None or expert not in self.experts):
            return False
        return True


@dataclass(frozen=True)
class Rule:
    selector: Selector
    tier: str


@dataclass(frozen=True)
class PlacementPlan:
    """Where each weight lives, plus the cache, policy and prefetch settings."""

    rules: tuple[Rule, ...] = ()
    default_expert_tier: str = "cache"  # for routed experts no rule names
    cache_bytes: int | None = None  # None = no limit (everything fits)
    cache_fraction: float | None = None  # alternative to cache_bytes: fraction of routed bytes
    cache_scope: str = "global"
    policy: str = "lru"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    prefetch: bool = False
    prefetch_max_inflight_bytes: int = 256 * 2**20
    max_ram: int | None = None
    source: str = "default"

    def tier_of(self, kind: str, layer: int | None = None, expert: int | None = None) -> str:
        """The tier of one weight group (always-on kinds are always resident)."""
        if kind in ALWAYS_ON_KINDS:
            return "resident"
        tier = self.default_expert_tier if kind == "routed_experts" else "resident"
        for rule in self.rules:
            if rule.selector.matches(kind, layer, expert):
                tier = rule.tier
        return tier

    def expert_tiers(self, spec: ModelSpec) -> dict[tuple[int, int], str]:
        """(layer, expert) -> tier for every routed expert of the model."""
        return {
            (layer, e): self.tier_of("routed_experts", layer, e)
            for layer in spec.moe_layer_ids
            for e in range(spec.num_experts)
        }

    def resolved_cache_bytes(self, routed_bytes: float) -> int | None:
        if self.cache_bytes is not None:
            return self.cache_bytes
        if self.cache_fraction is not None:
            return int(self.cache_fraction * routed_bytes)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "max_ram": self.max_ram,
            "cache_bytes": self.cache_bytes,
            "cache_fraction": self.cache_fraction,
            "cache_scope": self.cache_scope,
            "policy": self.policy,
            "policy_params": dict(self.policy_params),
            "prefetch": self.prefetch,
            "prefetch_max_inflight_bytes": self.prefetch_max_inflight_bytes,
            "default_expert_tier": self.default_expert_tier,
            "rules": [
                {
                    "kind": r.selector.kind,
                    "layers": sorted(r.selector.layers) if r.selector.layers is not None else None,
                    "experts": sorted(r.selector.experts) if r.selector.experts is not None else None,
                    "tier": r.tier,
                }
                for r in self.rules
            ],
        }


def plan_from_mapping(data: Mapping[str, Any], spec: ModelSpec, source: str = "plan") -> PlacementPlan:
    """Validate a declarative plan (already parsed from YAML/JSON) against a model."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at top level, got {type(data).__name__}")
    known = {"max_ram", "expert_cache", "cache_scope", "policy", "prefetch", "rules", "default_expert_tier"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    kw: dict[str, Any] = {"source": source}
    if data.get("max_ram") is not None:
        kw["max_ram"] = parse_bytes(data["max_ram"], f"{source}: field 'max_ram'")
    ec = data.get("expert_cache")
    if ec is not None:
        kw["cache_bytes"], kw["cache_fraction"] = parse_cache_option(ec, f"{source}: field 'expert_cache'")
    scope = data.get("cache_scope", "global")
    if scope not in CACHE_SCOPES:
        raise ConfigError(f"{source}: field 'cache_scope' must be one of {CACHE_SCOPES}, got {scope!r}")
    kw["cache_scope"] = scope
    det = data.get("default_expert_tier", "cache")
    if det not in TIERS:
        raise ConfigError(f"{source}: field 'default_expert_tier' must be one of {TIERS}, got {det!r}")
    kw["default_expert_tier"] = det
    pol = data.get("policy")
    if pol is not None:
        if isinstance(pol, str):
            pol = {"name": pol}
        if not isinstance(pol, Mapping) or not isinstance(pol.get("name"), str):
            raise ConfigError(f"{source}: field 'policy' must be a name or {{name: ..., <params>}}")
        kw["policy"] = pol["name"]
        kw["policy_params"] = {k: v for k, v in pol.items() if k != "name"}
    pf = data.get("prefetch")
    if pf is not None:
        if isinstance(pf, bool):
            kw["prefetch"] = pf
        elif isinstance(pf, Mapping):
            bad = sorted(set(pf) - {"enabled", "max_inflight_bytes"})
            if bad:
                raise ConfigError(f"{source}: field 'prefetch' has unknown key(s) {bad}")
            kw["prefetch"] = bool(pf.get("enabled", True))
            if pf.get("max_inflight_bytes") is not None:
                kw["prefetch_max_inflight_bytes"] = parse_bytes(
                    pf["max_inflight_bytes"], f"{source}: field 'prefetch.max_inflight_bytes'"
                )
        else:
            raise ConfigError(f"{source}: field 'prefetch' must be true/false or a mapping")
    rules = []
    for i, r in enumerate(data.get("rules") or []):
        where = f"{source}: rules[{i}]"
        if not isinstance(r, Mapping):
            raise ConfigError(f"{where}: expected a mapping like {{kind: routed_experts, layers: 0-29, tier: cache}}")
        bad = sorted(set(r) - {"kind", "layers", "experts", "tier"})
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; expected kind, layers, experts, tier")
        tier = r.get("tier")
        if tier not in TIERS:
            raise ConfigError(f"{where}: field 'tier' must be one of {TIERS}, got {tier!r}")
        kind = r.get("kind")
        if kind is not None and kind not in KINDS:
            raise ConfigError(f"{where}: field 'kind' must be one of {KINDS}, got {kind!r}")
        if kind in ALWAYS_ON_KINDS and tier != "resident":
            raise ConfigError(
                f"{where}: {kind} is always-on (read for every token) and must stay resident, not {tier}"
            )
        if kind is None and tier != "resident":
            raise ConfigError(f"{where}: a rule moving weights out of 'resident' must name kind: routed_experts")
        layers = _parse_range(r["layers"], f"{where}.layers", spec.num_layers) if "layers" in r else None
        experts = (
            _parse_range(r["experts"], f"{where}.experts", max(spec.num_experts, 1)) if "experts" in r else None
        )
        if experts is not None and kind not in (None, "routed_experts"):
            raise ConfigError(f"{where}: 'experts' only applies to kind: routed_experts")
        rules.append(Rule(Selector(kind=kind, layers=layers, experts=experts), tier))
    kw["rules"] = tuple(rules)
    return PlacementPlan(**kw)


def load_plan(path: str | Path, spec: ModelSpec) -> PlacementPlan:
    """Read a plan file (.yaml/.yml/.json) and validate it against ``spec``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: plan file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml/json syntax errors -> one clear line
        raise ConfigError(f"{p}: cannot parse plan file ({e.__class__.__name__}: {e})") from None
    return plan_from_mapping(data or {}, spec, source=str(p))


# ---------------------------------------------------------------------------------------
# tensor-name classification (HF checkpoint names -> weight group)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


def classify_tensor(name: str, spec: ModelSpec) -> tuple[str, int | None, int | None]:
    """Map a checkpoint tensor name to ``(kind, layer, expert)``.

    ``expert`` is set for per-expert tensors; fused expert tensors (``experts.gate_up_proj``)
    return ``expert=None`` (they hold every expert of the layer).
    """
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    if layer is None:
        if "embed_tokens" in name or name.endswith("wte.weight"):
            return "embedding", None, None
        if name.startswith("lm_head") or ".lm_head." in name or name.endswith("output.weight"):
            return "lm_head", None, None
        if "norm" in name:
            return "norms", None, None
        return "other", None, None
    if layer >= spec.num_layers:
        return "mtp", layer, None
    if "shared_expert_gate" in name:
        return "shared_experts", layer, None
    if "shared_expert" in name:  # shared_expert. / shared_experts.
        return "shared_experts", layer, None
    me = _EXPERT_RE.search(name)
    if ".experts." in name or name.endswith(".experts") or ".experts_" in name:
        return "routed_experts", layer, int(me.group(1)) if me else None
    if "self_attn" in name or ".attention." in name or ".attn." in name:
        if "norm" in name and ("q_norm" in name or "k_norm" in name or "layernorm" in name):
            return "norms", layer, None
        if name.endswith("sinks"):
            return "attention", layer, None
        return "attention", layer, None
    if "norm" in name:
        return "norms", layer, None
    if (
        ".gate.weight" in name
        or ".gate.bias" in name
        or ".router." in name
        or "e_score_correction_bias" in name
    ):
        return "router", layer, None
    if ".mlp." in name or ".feed_forward." in name or "block_sparse_moe" in name:
        return "dense_ffn", layer, None
    return "other", layer, None


# ---------------------------------------------------------------------------------------
# the default plan (from a RAM budget and run options)


def default_plan(spec: ModelSpec, census: Any = None, max_ram: Any = None, *, base: PlacementPlan | None = None,
                 policy: str | None = None, policy_params: Mapping[str, Any] | None = None,
                 expert_cache: Any = None, cache_scope: str | None = None, prefetch: bool | None = None,
                 prefetch_max_inflight_bytes: Any = None) -> PlacementPlan:
    """The plan for a run: ``base`` (a plan file, or the defaults) with the given options
    applied on top (``None`` = keep).

    ``max_ram`` bounds resident + cache + KV cache + activations; the cache is then sized at
    load time from the measured resident set (:mod:`moetier.weights.budget`) unless
    ``expert_cache`` (bytes, or a fraction in (0, 1] of the routed set) fixes it. With the
    census, a budget below the always-on set is refused here with the number needed.
    Defaults: policy ``lru`` (``adaptive`` when a budget is given), global cache, prefetch on
    when a budget is given.
    """
    import dataclasses

    from moetier.weights.policies import POLICIES

    p = base or PlacementPlan(source="default")
    kw: dict[str, Any] = {}
    if max_ram is not None:
        kw["max_ram"] = parse_bytes(max_ram, "--max-ram")
        if base is None:
            kw.setdefault("policy", "adaptive")
            kw.setdefault("prefetch", True)
    if policy is not None:
        if str(policy).lower() not in POLICIES or policy == "belady":
            names = ", ".join(n for n in POLICIES if n != "belady")
            raise ConfigError(f"--policy {policy!r}: expected one of {names} (belady needs the future: simulator only)")
        kw["policy"] = str(policy).lower()
    if policy_params is not None:
        kw["policy_params"] = dict(policy_params)
    if expert_cache is not None:
        kw["cache_bytes"], kw["cache_fraction"] = parse_cache_option(expert_cache, "--expert-cache")
    if cache_scope is not None:
        if cache_scope not in CACHE_SCOPES:
            raise ConfigError(f"--cache-scope {cache_scope!r}: expected one of {CACHE_SCOPES}")
        kw["cache_scope"] = cache_scope
    if prefetch is not None:
        kw["prefetch"] = bool(prefetch)
    if prefetch_max_inflight_bytes is not None:
        kw["prefetch_max_inflight_bytes"] = parse_bytes(prefetch_max_inflight_bytes, "prefetch max in-flight bytes")
    out = dataclasses.replace(p, **kw)
    if census is not None and out.max_ram is not None and census.always_on_bytes >= out.max_ram:
        raise ConfigError(
            f"--max-ram {out.max_ram / 1e9:.2f} GB is below the always-on set of {spec.name} "
            f"({census.always_on_bytes / 1e9:.2f} GB: attention, embeddings, norms, routers, dense and shared FFNs)"
        )
    return out
