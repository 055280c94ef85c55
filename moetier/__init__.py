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

    See :func:`moetier.runtime.load` for the options.
    """
    from moetier.runtime import load as _load

    return _load(path, **opts)
