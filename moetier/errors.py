"""User-facing errors.

Every mistake a user can make (a bad config field, a missing shard, an unknown machine)
raises a subclass of :class:`MoetierError` whose message names the file, tensor, field or
parameter and what was expected. The CLI prints the message (no traceback) and exits 2;
the server turns it into a 4xx answer.
"""

from __future__ import annotations


class MoetierError(ValueError):
    """A user mistake or bad input, with a message meant for a person."""


class ConfigError(MoetierError):
    """A config.json (or machine / plan file) field is missing or invalid."""


class UnsupportedModelError(MoetierError):
    """The model_type / architectures is not one moetier runs or plans."""


class WeightError(MoetierError):
    """A checkpoint file or tensor is missing, truncated, corrupt or mis-shaped."""


class MissingExtraError(MoetierError):
    """A feature needs an optional dependency group (``pip install 'moetier[EXTRA]'``) that is not installed."""
