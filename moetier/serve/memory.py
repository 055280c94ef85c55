"""What requests cost in RAM, so that ``--max-ram`` bounds them too (issue 13, item 2).

A request's memory, by phase (all bytes; the factors are measured, see docs/serve.md):

* **reading and parsing** its body: the body and its joined copy, the decoded text (up to 4 bytes
  per character: one character above U+FFFF makes the whole string UCS-4), the parsed JSON, the
  validated request. Charged per body by :func:`body_cost` = ``BYTES_PER_BODY_BYTE`` x bytes +
  ``BYTES_PER_JSON_VALUE`` x JSON values (``,{[`` in the body, an upper bound) +
  ``BYTES_PER_KEPT_VALUE`` x the values validation can keep (at most ``KEPT_VALUES_PER_TOKEN``
  x context: longer lists are refused first) + ``PREPARE_FIXED``, against the *body budget*
  (``--request-ram``): over it a request waits its turn (503 + Retry-After) or, if it alone
  exceeds it, is refused (413);
* **tokenising**: at most ``2 x context`` tokens are encoded whole (longer inputs are counted in
  pieces and refused), ``TOKENIZE_BYTES_PER_TOKEN`` each, by at most ``prepare_workers`` at once;
* **held** while waiting or running: the prompt's token ids (``array('i')``, 4 bytes each, while
  waiting; Python lists while running) and the output, ``HELD_FIXED`` per request besides.

The KV cache of running sequences is the budget's ``kv`` term (``weights/budget.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Measured with tracemalloc (peak of parse + validate + prepare, minus the body) over the shapes
# in docs/serve.md: <= 8 x bytes for text (ASCII + one emoji: decoded text and parsed string both
# UCS-4), <= 66 B per JSON value parsed (tiny messages), 490 B per value of an accepted chat of
# one-character messages (dicts, pydantic models, the template's copy).
BYTES_PER_BODY_BYTE = 10  # 8 measured + the body itself and its joined copy while read
BYTES_PER_JSON_VALUE = 72
MAX_BYTES_PER_BODY_BYTE = 32  # whatever the shape: 27.2 measured for a body of empty objects `{},{},...`
BYTES_PER_KEPT_VALUE = 448  # 490 - 66, with margin
KEPT_VALUES_PER_TOKEN = 8  # messages <= context are validated, ~3-5 JSON values each
PREPARE_FIXED = 256 << 10  # per request being prepared: pydantic, template rendering (117 kB measured)
# ru_maxrss rise of encoding 1-4 MB of text with the embedded model's tokenizer: 389-511 B per token
TOKENIZE_BYTES_PER_TOKEN = 512
HELD_WAITING_PER_TOKEN = 4  # array('i') of prompt ids
HELD_RUNNING_PER_TOKEN = 128  # ids as Python ints in 3 lists (pending, the sequence's, the output) + text
HELD_FIXED = 16 << 10  # handle, event queue, the request without its input
BODY_BUDGET_BODIES = 4  # default body budget: this many of the largest bodies at once
MIN_REQUEST_RAM = 16 * 10**6  # default --request-ram with --max-ram: at least this ...
REQUEST_RAM_SHARE = 0.05  # ... or this share of --max-ram


def json_values(body: bytes) -> int:
    """Upper bound of the JSON values in ``body`` (each but the first follows a ``,`` or opens)."""
    return body.count(b",") + body.count(b"{") + body.count(b"[") + 1


def body_cost(body: bytes, context: int) -> int:
    """Bytes reading, parsing and preparing ``body`` may take at its peak (an upper bound)."""
    return _cost(len(body), json_values(body), context)


def _cost(n: int, values: int, context: int) -> int:
    parse = min(BYTES_PER_BODY_BYTE * n + BYTES_PER_JSON_VALUE * values, MAX_BYTES_PER_BODY_BYTE * n)
    return parse + BYTES_PER_KEPT_VALUE * min(values, KEPT_VALUES_PER_TOKEN * context) + PREPARE_FIXED


def largest_body_for(request_ram: int) -> int:
    """The largest plain-text body whose cost fits ``request_ram``."""
    return max(0, (request_ram - PREPARE_FIXED - (BYTES_PER_JSON_VALUE + BYTES_PER_KEPT_VALUE) * 16)
               // BYTES_PER_BODY_BYTE)


def default_request_ram(max_ram: int | None, max_body: int = 0, context: int = 0) -> int:
    """``--request-ram auto``: with ``--max-ram``, max(16 MB, 5 % of it); else room for
    ``BODY_BUDGET_BODIES`` bodies of ``max_body`` bytes of any shape."""
    if max_ram is not None:
        return int(max(MIN_REQUEST_RAM, REQUEST_RAM_SHARE * max_ram))
    return BODY_BUDGET_BODIES * _cost(max_body, max_body, context)


@dataclass(frozen=True)
class RequestMemory:
    """The request term of the RAM budget, by part (bytes)."""

    bodies: int  # the body budget (--request-ram)
    tokenizing: int
    waiting: int
    running: int

    @property
    def total(self) -> int:
        return self.bodies + self.tokenizing + self.waiting + self.running

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def request_memory(*, context: int, request_ram: int, max_queue: int, max_batch: int,
                   prepare_workers: int = 2) -> RequestMemory:
    """Request memory of a server with these settings (``context``: the longest sequence)."""
    return RequestMemory(
        bodies=int(request_ram),
        tokenizing=prepare_workers * 2 * context * TOKENIZE_BYTES_PER_TOKEN,
        waiting=max_queue * (context * HELD_WAITING_PER_TOKEN + HELD_FIXED),
        running=max_batch * (context * HELD_RUNNING_PER_TOKEN + HELD_FIXED),
    )
