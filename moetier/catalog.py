"""Built-in catalog of real model architectures (``moetier/data/catalog/<name>.json``).

Each entry holds the model's Hugging Face ``config.json`` architecture fields (``config``) plus
metadata: the HF repo id, the format the published checkpoint stores its weights in, and the
publisher's total / active parameter counts with the *counting convention* they follow and where
they were read. Publishers do not count "active parameters" the same way:

* ``embedding_and_lm_head``: the count includes the embedding table and the LM head
  (DeepSeek, Qwen, Mistral, AllenAI, Meta); compare with ``Census.active_params``;
* ``lm_head_only``: the count includes the LM head but not the embedding lookup (OpenAI's
  gpt-oss); compare with ``Census.active_params_excluding_embedding``;
* ``unstated``: the figure matches neither exactly.

The configs come from /work/shared/data/model-configs (see its README for the sources).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from moetier.errors import ConfigError
from moetier.spec import ModelSpec, load_spec, spec_from_config

CONVENTIONS: dict[str, str] = {
    "embedding_and_lm_head": "counts the embedding table and the LM head",
    "lm_head_only": "counts the LM head, not the embedding lookup",
    "unstated": "matches neither convention exactly",
}


@dataclass(frozen=True)
class Published:
    """A publisher's headline parameter counts for one model."""

    total_params: int
    active_params: int
    convention: str  # a key of CONVENTIONS
    source: str

    @property
    def convention_text(self) -> str:
        return CONVENTIONS[self.convention]

    @property
    def census_field(self) -> str:
        """The Census attribute the published active figure should be compared with."""
        if self.convention == "lm_head_only":
            return "active_params_excluding_embedding"
        return "active_params"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hf_repo: str
    checkpoint_precision: str  # a moetier precision string (see planner.census.parse_precision)
    published: Published
    notes: tuple[str, ...]
    config_source: Mapping[str, str]
    config: Mapping[str, Any]


def _files() -> dict[str, Any]:
    root = resources.files("moetier") / "data" / "catalog"
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(sorted(_files()))


def names() -> list[str]:
    """Sorted catalog names (``deepseek-v3``, ``mixtral-8x7b``, ...)."""
    return list(_names())


def _require(d: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ConfigError(f"{where}: field {key!r} must be a {kind.__name__}, got {v!r}")
    return v


@cache
def entry(name: str) -> CatalogEntry:
    """The full catalog entry of ``name``; raises ConfigError listing the names if unknown."""
    files = _files()
    if name not in files:
        raise ConfigError(f"model {name!r} is not in the catalog; catalog names: {', '.join(names())}")
    where = f"catalog entry {name}.json"
    try:
        data = json.loads(files[name].read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # pragma: no cover - shipped data is tested
        raise ConfigError(f"{where}: not valid JSON ({e})") from None
    pub = _require(data, "published", dict, where)
    conv = _require(pub, "convention", str, where + " published")
    if conv not in CONVENTIONS:
        raise ConfigError(f"{where}: published.convention must be one of {', '.join(CONVENTIONS)}; got {conv!r}")
    published = Published(
        total_params=_require(pub, "total_params", int, where + " published"),
        active_params=_require(pub, "active_params", int, where + " published"),
        convention=conv,
        source=_require(pub, "source", str, where + " published"),
    )
    return CatalogEntry(
        name=name,
        hf_repo=_require(data, "hf_repo", str, where),
        checkpoint_precision=_require(data, "checkpoint_precision", str, where),
        published=published,
        notes=tuple(data.get("notes") or ()),
        config_source=dict(_require(data, "config_source", dict, where)),
        config=_require(data, "config", dict, where),
    )


@cache
def get(name: str) -> ModelSpec:
    """The catalog model ``name`` as a ModelSpec (``spec.name == name``)."""
    e = entry(name)
    return spec_from_config(e.config, name=name, source=f"catalog entry {name}.json (config)")


def published(name: str) -> Published:
    """The publisher's total / active parameter counts of ``name`` and how they were counted."""
    return entry(name).published


def resolve_model(model: str | Path) -> ModelSpec:
    """A catalog name (``deepseek-v3``), a config.json path, a model directory or a GGUF file."""
    p = Path(model)
    if p.exists():
        return load_spec(p)
    if isinstance(model, str) and model in names():
        return get(model)
    raise ConfigError(
        f"model {str(model)!r}: not a config.json, a model directory, a .gguf file, or a catalog name; "
        f"catalog names: {', '.join(names())}"
    )
