"""Helpers shared by the native-path tests: loading, checkpoint caches, the step drivers
(prefill then greedy, one token at a time, forced tokens), KV snapshots and the providers that
force the per-expert native path. Fixtures (``_native_on``, ``lib``, ``absorbed``) live in
conftest.py."""

from __future__ import annotations

import pytest
import torch

import moetier
from moetier.models.base import ExpertWeights, InMemoryExpertProvider
from tests.helpers.checkpoints import make_tiny_checkpoint


def load(path, **kw):
    return moetier.load(path, tokenizer=False, **kw)


def checkpoints(tmp_path_factory, configs: dict, family: str | None = None):
    """A cache ``get(name, **extra)`` of tiny checkpoints: ``configs[name]`` is ``(family, overrides)``,
    or just the overrides when every entry has the same ``family``; a name not in ``configs`` is a
    family with its defaults."""
    made: dict[tuple, object] = {}

    def get(name: str, **extra):
        key = (name, tuple(sorted(extra.items())))
        if key not in made:
            if family is not None:
                fam, over = family, configs.get(name, {})
            else:
                fam, over = configs[name] if name in configs else (name, {})
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), fam, tokenizer=False, **{**over, **extra})
        return made[key]

    return get


def ckpt_fixture(configs: dict, family: str | None = None):
    """A module-scoped ``ckpt`` fixture over :func:`checkpoints`."""

    @pytest.fixture(scope="module")
    def ckpt(tmp_path_factory):
        return checkpoints(tmp_path_factory, configs, family)

    return ckpt


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def count_native(model) -> list[int]:
    """Record every token that goes through ``net.native.step``."""
    calls: list[int] = []
    dec = model.net.native
    inner = dec.step

    def step(seq, token):
        calls.append(token)
        return inner(seq, token)

    dec.step = step
    return calls


def count_many(model) -> list[int]:
    """Tokens per call of the native multi-token path."""
    calls: list[int] = []
    dec = model.net.native
    inner = dec.step_many

    def step_many(items, all_logits=False):
        calls.append(sum(t.shape[0] for _, t in items))
        return inner(items, all_logits)

    dec.step_many = step_many
    return calls


def greedy_steps(model, prompt, steps, first: int = 7):
    """Prefill ``prompt`` (if any; else the first token is ``first``), then ``steps`` greedy
    single-token steps: (logits [steps + 1, V] (or [steps, V] without a prompt), tokens)."""
    seq = model.new_sequence()
    out = [model.step([(seq, prompt)])[0]] if prompt else []
    toks, tok = [], first
    for _ in range(steps):
        if out:
            tok = int(out[-1].argmax())
        toks.append(tok)
        out.append(model.step([(seq, [tok])])[0])
    return torch.stack(out), toks


def prefill_then_greedy(model, prompt, steps):
    """All logits of the prompt [len(prompt), V], then ``steps`` greedy steps: (logits, tokens)."""
    seq = model.new_sequence()
    out = [model.step([(seq, prompt)], all_logits=True)]
    toks = []
    for _ in range(steps):
        toks.append(int(out[-1][-1].argmax()))
        out.append(model.step([(seq, [toks[-1]])]))
    return torch.cat(out), toks


def one_by_one(model, tokens, seq=None):
    """Logits of ``tokens`` fed one at a time (single-token native steps) [len, V], and the sequence."""
    seq = seq if seq is not None else model.new_sequence()
    return torch.cat([model.step([(seq, [t])]) for t in tokens]), seq


def kv(seq):
    """The cache rows written so far, per layer: [H, L, D] tensors (MHA / GQA caches are
    [H, capacity, D]; the MLA latent cache is [capacity, C] and uses :func:`latent_kv`)."""
    return [[c[:, : seq.length].clone() for c in layer] for layer in seq.layers]


def latent_kv(seq):
    """The MLA latent cache rows written so far: per layer (c_kv [L, C], k_rot [L, dr])."""
    return [[c[: seq.length].clone() for c in layer] for layer in seq.layers]


def same_kv(a, b) -> bool:
    return all(torch.equal(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True))


class DelegatingProvider:
    """The in-memory provider without ``stable_gets``: the native step goes one expert per call."""

    def __init__(self, inner):
        self.inner = inner

    def require(self, layer, expert_ids):
        self.inner.require(layer, expert_ids)

    def get(self, layer, expert):
        return self.inner.get(layer, expert)


class RecyclingProvider(DelegatingProvider):
    """Every get() is served from ONE reused slot (valid only until the next get), biases
    included, like a slot pool under pressure."""

    def __init__(self, inner):
        super().__init__(inner)
        self.slot: ExpertWeights | None = None
        self.gets = 0

    def get(self, layer, expert):
        ew = self.inner.get(layer, expert)
        if self.slot is None:
            self.slot = ExpertWeights(torch.empty_like(ew.gate_up), torch.empty_like(ew.down),
                                      None if ew.gate_up_bias is None else torch.empty_like(ew.gate_up_bias),
                                      None if ew.down_bias is None else torch.empty_like(ew.down_bias))
        for dst, src in ((self.slot.gate_up, ew.gate_up), (self.slot.down, ew.down),
                         (self.slot.gate_up_bias, ew.gate_up_bias), (self.slot.down_bias, ew.down_bias)):
            if src is not None:
                dst.copy_(src)
        self.gets += 1
        return self.slot


def wrapped(cls):
    """A provider factory for ``moetier.load(..., provider=...)``: ``cls`` around the in-memory provider."""
    return lambda spec, reader: cls(InMemoryExpertProvider.from_reader(spec, reader))
