"""Background expert reads and router-based prefetch.

* :class:`IOWorker` - a background thread (or a few) reading experts from the
  :class:`~moetier.weights.store.ExpertStore` into slots. Jobs are prioritised: reads the
  current layer is waiting for (``demand``) go before guesses (``prefetch``). ``os.preadv``
  releases the GIL, so reads overlap the compute thread's matmuls. The reading threads run
  at a higher scheduling priority than compute when permitted (``store.IO_NICE``).
* :class:`RouterPrefetcher` - installs forward pre-hooks on a loaded model: just before the
  FFN of MoE layer ``L`` runs, it applies the *next* MoE layer's post-attention norm and
  router to layer ``L``'s residual stream (``Model.route`` semantics), ranks the guessed
  experts by router weight and hands them to the provider, which starts reading the ones
  not already in RAM, bounded by the prefetch slots (``prefetch_max_inflight_bytes``). The
  reads then overlap layer ``L``'s expert compute and layer ``L+1``'s attention. Guesses
  never change what is computed: a wrong guess only costs a wasted read.

Precision/recall of the guesses are counted by the provider when the layer's real routing
arrives (:class:`~moetier.weights.metrics.HierarchyMetrics`).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moetier.weights.metrics import HierarchyMetrics
from moetier.weights.store import ExpertStore, io_thread_priority

DEMAND, PREFETCH = 0, 1


@dataclass(eq=False)
class ReadJob:
    """One expert read into one slot."""

    layer: int
    expert: int
    slot: int
    prefetch: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False
    started: bool = False
    nbytes: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)


class IOWorker:
    """Reads experts in background threads, demand jobs first."""

    def __init__(self, store: ExpertStore, slot: Callable[[int], torch.Tensor], metrics: HierarchyMetrics,
                 threads: int = 1):
        self.store, self.slot, self.metrics = store, slot, metrics
        self._heap: list[tuple[int, int, ReadJob]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"moetier-io-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()
        _LIVE.add(self)

    def submit(self, job: ReadJob) -> ReadJob:
        with self._cv:
            if self._closed:
                raise RuntimeError("IOWorker is closed")
            heapq.heappush(self._heap, (PREFETCH if job.prefetch else DEMAND, next(self._seq), job))
            self._cv.notify()
        return job

    def promote(self, job: ReadJob) -> None:
        """A queued prefetch became a demand read: move it ahead of other guesses."""
        with self._cv:
            if not job.started and not job.done.is_set():
                heapq.heappush(self._heap, (DEMAND, next(self._seq), job))
                self._cv.notify()

    def _run(self) -> None:
        io_thread_priority()
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed and not self._heap:
                    return
                _, _, job = heapq.heappop(self._heap)
                if job.started or job.done.is_set():
                    continue  # promoted duplicate
                job.started = True
            if job.cancelled:
                job.done.set()
                continue
            t0 = time.perf_counter()
            try:
                self.store.read_into(job.layer, job.expert, self.slot(job.slot))
                job.nbytes = self.store.last_bytes()
            except BaseException as e:  # reported to the waiting thread
                job.error = e
            self.metrics.add_read(job.nbytes, time.perf_counter() - t0, job.prefetch)
            job.done.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, job in self._heap:
                job.cancelled = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)


_LIVE: weakref.WeakSet[IOWorker] = weakref.WeakSet()


@atexit.register
def _close_live_workers() -> None:
    """Drain the reading threads before the interpreter finalizes. They are daemon threads
    (an idle one must not keep the process alive), but one caught inside a torch call that
    released the GIL (a read's copy or finite check) would be stopped by ``pthread_exit``
    when it takes the GIL back during finalization, and unwinding through torch's C++ frames
    aborts the process ("terminate called without an active exception", exit -6). atexit
    runs before that, while the threads still run: queued guesses are dropped and the reads
    in flight finish."""
    for w in list(_LIVE):
        w.close()


class RouterPrefetcher:
    """Forward pre-hooks that guess the next MoE layer's experts (see module docstring)."""

    def __init__(self, net: Any, on_guess: Callable[[int, list[int]], None]):
        self.net, self.on_guess = net, on_guess
        self.handles: list[Any] = []
        blocks = net.moe_blocks()
        ids = sorted(blocks)
        for here, nxt in zip(ids, ids[1:]):
            cur_layer, next_layer = net.layers[here], net.layers[nxt]
            norm_here = getattr(cur_layer, "post_attention_layernorm", None)
            norm_next = getattr(next_layer, "post_attention_layernorm", None)
            if norm_here is None or norm_next is None or not hasattr(blocks[nxt], "route"):
                continue
            self.handles.append(norm_here.register_forward_pre_hook(self._hook(nxt, norm_next, blocks[nxt])))

    def _hook(self, layer: int, norm: Any, block: Any) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            h = args[0]
            x = norm.forward(h)  # .forward: no hooks of the next layer fire
            ids, w = block.route(x)
            if ids.shape[0] == 1:
                order = ids[0].tolist()  # router order = descending weight
            else:
                score = torch.zeros(int(ids.max()) + 1, dtype=torch.float32)
                score.index_add_(0, ids.reshape(-1), w.reshape(-1).float())
                order = [int(e) for e in torch.argsort(score, descending=True, stable=True) if score[e] > 0]
            self.on_guess(layer, order)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
