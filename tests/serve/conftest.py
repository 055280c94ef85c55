"""Fixtures: a tiny qwen3_moe checkpoint, a reference model, servers on free loopback ports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import moetier
from moetier.serve.app import BackgroundServer, build_app
from moetier.serve.engine import ModelBackend
from tests.helpers.checkpoints import make_tiny_checkpoint

SERVED = "served"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve"), "qwen3_moe", seed=3)


@pytest.fixture(scope="session")
def ref_model(tiny_dir: Path) -> Any:
    """A separate instance for single-request references (models are not thread-safe)."""
    return moetier.load(tiny_dir)


class SlowBackend(ModelBackend):
    """Real model, but every step sleeps (to hold requests in flight), never yields EOS (so
    requests run to max_tokens) and records the sequences it creates."""

    def __init__(self, model: Any, delay: float = 0.05):
        super().__init__(model)
        self.delay = delay
        self.sequences: list[Any] = []
        self.fail_next = threading.Event()

    def new_sequence(self, capacity: int) -> Any:
        seq = super().new_sequence(capacity)
        self.sequences.append(seq)
        return seq

    def step(self, batch: Any) -> Any:
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("injected fault")
        time.sleep(self.delay)
        logits = super().step(batch).clone()
        logits[:, list(self.eos_ids)] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[BackgroundServer]:
    app = build_app(moetier.load(tiny_dir), model_name=SERVED, max_batch=8, max_queue=32)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(tiny_dir: Path) -> Iterator[str]:
    """A server requiring an API key, with a small body limit (the error corpus)."""
    from tests.serve.test_errors import KEY, MAX_BODY

    app = build_app(moetier.load(tiny_dir), model_name=SERVED, api_key=KEY, max_body_bytes=MAX_BODY)
    with BackgroundServer(app) as srv:
        yield srv.base_url


@pytest.fixture()
def slow_server(tiny_dir: Path) -> Iterator[tuple[BackgroundServer, SlowBackend]]:
    model = moetier.load(tiny_dir)
    backend = SlowBackend(model)
    app = build_app(model, model_name=SERVED, max_batch=1, max_queue=1, backend=backend)
    with BackgroundServer(app) as srv:
        yield srv, backend
