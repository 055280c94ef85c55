"""Expert parallelism on ``torch.distributed`` (gloo on CPU): see docs/expert-parallel.md.

* :mod:`.placement` - which experts each rank holds (torch-free: the planner writes it);
* :mod:`.executor` - the group: dispatch / combine with point-to-point messages, follower loop;
* :mod:`.rank` - :func:`load` one rank's share of a model, :func:`install` the dispatch;
* :mod:`.launch` - ``moetier run --ep auto|P``.

``import moetier.distributed as ep`` then ``ep.init()``, ``ep.load(...)``, ``group.serve(model)``
/ ``group.stop()``, ``ep.shutdown()``. Names are imported lazily (the planner imports
:mod:`.placement` without torch).
"""

from __future__ import annotations

from typing import Any

_NAMES = {
    "DistributedError": "executor", "EPGroup": "executor", "EPStats": "executor", "ExpertParallelProvider": "executor",
    "init": "executor", "shutdown": "executor", "model_digest": "executor", "exit_after_fault": "executor",
    "pinned_cpus": "executor", "DEFAULT_EXCHANGE": "executor",
    "install": "rank", "load": "rank",
    "EPPlacement": "placement", "contiguous": "placement",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'moetier.distributed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"moetier.distributed.{_NAMES[name]}"), name)
