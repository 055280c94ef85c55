"""Decoding: sampling (greedy, temperature, top-k, top-p, seed), stop strings, results."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moetier.errors import MoetierError


class GenerationError(MoetierError):
    """Invalid generation parameters."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Picks the next token from float32 logits [V] (or [B, V] -> one per row).

    Numerically safe for every accepted parameter (any finite temperature > 0, any top_p in
    (0, 1], down to denormals): the logits are shifted so each row's maximum is exactly 0 and
    scaled in float64, so ``x / temperature`` is 0 at the maximum and <= 0 (possibly -inf)
    elsewhere -- never inf - inf or 0 / 0 -- and top-p always keeps the most likely token.
    A vanishing temperature or top_p therefore tends to the argmax, as its limit does.
    """

    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen: torch.Generator | None = None
        if not params.greedy:
            self.gen = torch.Generator()
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> token ids [B]."""
        p = self.p
        if p.greedy:
            return logits.argmax(dim=-1)
        x = logits.double()  # [B, V]
        top = x.amax(dim=-1, keepdim=True)  # [B, 1]
        if not bool(torch.isfinite(top).all()) or bool(x.isnan().any()):
            raise GenerationError("logits have no finite maximum (NaN, +inf or all -inf): cannot sample")
        x = (x - top) / p.temperature  # max exactly 0, the rest <= 0
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x.topk(p.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(-1)
            drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest prefix reaching top_p
            drop[..., 0] = False  # ... which is never empty
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
        probs = x.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen)[..., 0]


class TextStream:
    """Incremental detokenisation with stop strings.

    ``push(token)`` returns the newly printable text; text that could still become a stop
    string, and incomplete UTF-8, is held back. ``stopped`` turns True once a stop string
    appears; the stop string itself is never emitted.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # full decoded text (up to the stop, once stopped)
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete multi-byte character
            return ""
        self.text = text
        hold = 0
        for s in self.stop:
            i = text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0:
                self.stopped = True
                self.text = text = text[: min(i, len(text))]
        if not self.stopped:
            for s in self.stop:  # longest suffix of text that is a prefix of a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
        out = text[self.emitted : len(text) - hold]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        """The rest of the text at the end of generation, including a trailing incomplete
        UTF-8 sequence (decoded as U+FFFD, as the full decode would show it)."""
        if not self.stopped and self.ids:
            self.text = self.decode(self.ids)
        out = self.text[self.emitted :]
        self.emitted += len(out)
        return out


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]  # generated token ids (eos not included)
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # single-token forwards timed in decode_s
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Single-token forwards per second (the first new token comes from the prefill)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0
