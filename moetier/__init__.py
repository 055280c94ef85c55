"""moetier: run and plan Mixture-of-Experts inference over a weight hierarchy."""

from __future__ import annotations

import sys
from typing import Any

if "torch" not in sys.modules:  # libgomp reads its wait policy once, when torch loads it
    from moetier.threads import set_wait_policy

    set_wait_policy()

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path: Any = None, **opts: Any) -> Any:
    """Load a model for inference; ``path=None`` is the embedded model.

    Options: those of :func:`moetier.runtime.load` (everything in RAM); any other option is a
    weight-hierarchy one (``max_ram``, ``expert_cache``, ``policy``, ``prefetch``, ``plan``, ...)
    and the model is loaded by :func:`moetier.weights.tiered.load`, with its routed experts
    served from a cache over the files.
    """
    import inspect

    from moetier import runtime

    hierarchy = set(opts) - set(inspect.signature(runtime.load).parameters)
    if not hierarchy:
        return runtime.load(path, **opts)
    if opts.get("expert_provider_factory") is not None:
        from moetier.errors import ConfigError

        raise ConfigError("pass either expert_provider_factory or weight-hierarchy options, not both")
    from moetier.weights import tiered

    return tiered.load(path, **opts)
