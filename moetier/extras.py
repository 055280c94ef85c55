"""Optional dependency groups ("extras") and the one-line error when one is missing.

The core install (``pip install moetier``) runs the CLI, the planner and the runtime. Features
that need more import their packages lazily through :func:`require`, which raises
:class:`~moetier.errors.MissingExtraError` naming the extra to install, e.g. ``moetier serve needs
the 'serve' extra: pip install 'moetier[serve]' (missing: fastapi)``; the CLI prints it as one line.

:data:`EXTRAS` mirrors ``[project.optional-dependencies]`` in pyproject.toml (a test keeps them
equal); ``dev`` installs all of them plus the test tools.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

from moetier.errors import MissingExtraError

# extra -> the distributions it installs itself, besides other extras it includes (``bench`` includes
# ``serve`` and ``plot``); the import name is the distribution name for all of them
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "pydantic"),  # moetier serve (OpenAI-compatible HTTP API)
    "plot": ("matplotlib",),  # PNG plots: moetier trace stats --plot, moetier plan --plot
    "gguf": ("gguf",),  # reading GGUF checkpoints
    "bench": ("transformers", "accelerate", "httpx", "safetensors"),  # bench/: peers, serve load, checkpoints
}


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Import ``modules`` (default: the extra's packages) or raise one line naming ``extra``.

    ``what`` is the feature, as the user invoked it (``"moetier serve"``, ``"--plot"``).
    """
    for mod in modules if modules is not None else EXTRAS[extra]:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise MissingExtraError(
                f"{what} needs the '{extra}' extra: pip install 'moetier[{extra}]' (missing: {mod})"
            ) from e


def versions() -> dict[str, dict[str, str | None]]:
    """Installed version of each extra's distributions (``None``: not installed or not importable)."""
    out: dict[str, dict[str, str | None]] = {}
    for extra, dists in EXTRAS.items():
        out[extra] = {}
        for d in dists:
            try:
                found = importlib.util.find_spec(d) is not None  # finds, does not import
                out[extra][d] = importlib.metadata.version(d) if found else None
            except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
                out[extra][d] = None
    return out
