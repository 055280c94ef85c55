"""Sampling under every parameter value the server accepts: never NaN, an exception or a hang.

A seeded random loop (a property test without extra dependencies) draws temperature, top_p,
top_k and seed from the ranges the protocol validates, including the extremes (denormal
temperatures and top_p, huge top_k, 64-bit seeds), over logits with ties, huge magnitudes and
-inf entries, and checks each pick is a finite, allowed token id.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

from moetier.generation import GenerationError, Sampler, SamplingParams
from moetier.serve.protocol import CompletionRequest, ServeError, parse_request

TINY = [5e-324, 1e-320, 1e-310, 1e-46, 1e-45, 1e-40, 1e-38, 1e-30, 1e-8]


def _draw_unit(rng: random.Random, hi: float) -> float:
    """A value in (0, hi]: the edges, or log-uniform across the whole double range."""
    r = rng.random()
    if r < 0.3:
        return rng.choice(TINY)
    if r < 0.4:
        return hi
    return min(hi, 10 ** rng.uniform(-323, math.log10(hi)))


def _draw_logits(rng: random.Random, gen: torch.Generator, v: int) -> torch.Tensor:
    kind = rng.randrange(5)
    if kind == 0:
        x = torch.randn(v, generator=gen)
    elif kind == 1:  # huge magnitudes
        x = torch.randn(v, generator=gen) * 1e30
    elif kind == 2:  # exact ties at the top
        x = torch.randn(v, generator=gen)
        x[: rng.randrange(2, v)] = x.max() + 1
    elif kind == 3:  # masked tokens (-inf), at least one left
        x = torch.randn(v, generator=gen)
        x[torch.randperm(v, generator=gen)[: rng.randrange(0, v)]] = float("-inf")
    else:  # float32 extremes
        x = torch.full((v,), -3.4e38)
        x[rng.randrange(v)] = 3.4e38
    return x


def test_sampler_property_random_params() -> None:
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(99)
    v = 37
    for i in range(1500):
        temperature = 0.0 if rng.random() < 0.05 else _draw_unit(rng, 2.0)
        top_p = _draw_unit(rng, 1.0)
        top_k = rng.choice([0, 1, 2, rng.randrange(0, v + 3), v, v + 1, 1 << 62])
        seed = rng.choice([None, 0, -(1 << 63), (1 << 64) - 1, rng.randrange(-(1 << 63), 1 << 64)])
        logits = _draw_logits(rng, gen, v)
        s = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        rows = torch.stack([logits, logits.flip(0)])  # [B=2, V]
        tok = s(rows)
        case = f"case {i}: T={temperature!r} top_p={top_p!r} top_k={top_k} seed={seed}"
        assert tok.shape == (2,), case
        for b in range(2):
            t = int(tok[b])
            assert 0 <= t < v, case
            assert rows[b, t] > float("-inf"), case  # never a masked token
            if temperature <= 1e-30 and top_k != 1:  # (near-)zero temperature: one of the maxima
                assert rows[b, t] == rows[b].max(), case


def test_tiny_temperature_and_top_p_pick_the_argmax() -> None:
    x = torch.tensor([[0.5, 3.0, -1.0, 2.999]])
    for t, p in [(1e-45, 1.0), (5e-324, 1.0), (1.0, 1e-46), (1.0, 5e-324), (1e-40, 1e-40)]:
        assert int(Sampler(SamplingParams(t, 0, p, seed=1))(x)[0]) == 1, (t, p)


def test_sampler_rejects_what_it_cannot_sample() -> None:
    for bad in [dict(temperature=math.inf), dict(temperature=math.nan), dict(top_p=math.nan), dict(top_p=0.0)]:
        with pytest.raises(GenerationError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    s = Sampler(SamplingParams(1.0, seed=0))
    for rows in (torch.full((1, 4), float("-inf")), torch.tensor([[0.0, math.nan, 1.0, 2.0]])):
        with pytest.raises(GenerationError, match="logits"):
            s(rows)


def test_protocol_accepts_only_what_sampling_handles() -> None:
    """Every temperature/top_p the protocol accepts builds a working sampler."""
    rng = random.Random(7)
    x = torch.randn(1, 11)
    for _ in range(300):
        body = {"prompt": "x", "temperature": _draw_unit(rng, 2.0), "top_p": _draw_unit(rng, 1.0)}
        body["top_k"] = rng.choice([0, 1, 5, sys.maxsize])
        try:
            req = parse_request(repr(body).replace("'", '"').encode(), CompletionRequest)
        except ServeError:
            continue
        s = Sampler(SamplingParams(req.temperature or 0.0, req.top_k or 0, req.top_p or 1.0, 3))
        assert 0 <= int(s(x)[0]) < 11
