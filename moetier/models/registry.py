"""Model classes keyed by HF ``architectures`` name (with a family fallback).

Family modules in ``moetier/models/`` register themselves with :func:`register`; they are
discovered automatically, so adding a family never touches this file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from moetier.errors import UnsupportedModelError
from moetier.spec import ModelSpec, supported_summary

if TYPE_CHECKING:
    from moetier.models.base import DecoderLM

_BY_ARCH: dict[str, type[DecoderLM]] = {}
_BY_FAMILY: dict[str, type[DecoderLM]] = {}
_discovered = False


def register(*architectures: str, family: str) -> Callable[[type[DecoderLM]], type[DecoderLM]]:
    """Class decorator: ``@register("Qwen3MoeForCausalLM", family="qwen3_moe")``."""

    def deco(cls: type[DecoderLM]) -> type[DecoderLM]:
        for a in architectures:
            _BY_ARCH[a] = cls
        _BY_FAMILY.setdefault(family, cls)
        cls.family = family
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import moetier.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("base", "registry") or info.name.startswith("_"):
            continue
        importlib.import_module(f"moetier.models.{info.name}")
    _discovered = True


def model_class(spec: ModelSpec) -> type[DecoderLM]:
    """The runnable class for ``spec`` or UnsupportedModelError."""
    _discover()
    cls = _BY_ARCH.get(spec.architecture) or _BY_FAMILY.get(spec.family)
    if cls is None:
        runnable = ", ".join(sorted(_BY_ARCH))
        raise UnsupportedModelError(
            f"{spec.name}: architecture {spec.architecture or spec.model_type!r} can be planned but "
            f"not run yet (runnable architectures: {runnable}); {supported_summary()}"
        )
    return cls


def runnable_architectures() -> list[str]:
    _discover()
    return sorted(_BY_ARCH)
