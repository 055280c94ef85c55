"""The native exchange's ring protocol (moetier/native/csrc/ep.c, moetier/distributed/native_ep.py)
against the Python rings of moetier/distributed/shm.py, in one process: a follower's C loop
(``mt_ep_serve``) reading what a Python writer sent, leaving other messages to Python, and its
waits (futex wake-up, the 20 ms liveness callback, out-of-sequence slots). Under a real job (the C
exchange on both ranks, bit-identical to one process, the planner's bytes, a dying rank) it is
covered by test_expert_parallel.py's native cases on shared memory."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading
import time
import uuid

import pytest
import torch

from moetier import native
from moetier.distributed import native_ep, shm
from moetier.distributed.executor import CMD_MOE_NATIVE, CMD_PING

pytestmark = pytest.mark.skipif(platform.machine().lower() not in shm.X86_64 or not shm.SHM_DIR.is_dir(),
                                reason="the shm transport is x86-64 Linux with /dev/shm only")

SLOT = 256


@pytest.fixture
def rings():
    """(writer, reader) of one control ring (rank 0 -> this follower) and the reader's C state."""
    name = f"{shm.PREFIX}test-{uuid.uuid4().hex[:12]}"
    mm = shm.create(name, shm.HEADER_BYTES + 2 * shm.ring_bytes(SLOT))
    peer = shm.Peer(0, os.getpid(), shm.start_time(os.getpid()))
    w, r = (shm.Ring(mm, shm.HEADER_BYTES, SLOT, peer, "control to rank 1", 50e-6, 5.0, 1) for _ in range(2))
    ans = shm.Ring(mm, shm.HEADER_BYTES + shm.ring_bytes(SLOT), SLOT, peer, "answers of rank 1", 50e-6, 5.0, 1)
    yield w, r, ans
    shm.unlink(name)


class Follower:
    """An ``EPState`` for rank 1 of 2 over ``reader`` / ``ans`` with a liveness callback that stops
    the wait after ``stop_after_s`` (the step timeout's role)."""

    def __init__(self, reader: shm.Ring, ans: shm.Ring, stop_after_s: float = 5.0):
        self.calls: list[float] = []
        self.stop_after_s = stop_after_s
        reader.st.id, ans.st.id = 0, 1
        self.ctrl, self.ans = (ctypes.c_void_p * 2)(), (ctypes.c_void_p * 2)()
        self.ctrl[0], self.ans[0] = ctypes.addressof(reader.st), ctypes.addressof(ans.st)
        self.cb = native_ep.CHECK_FN(self.check)
        self.st = native_ep.EPState(world=2, rank=1, H=8, e_max=4, ctrl_bytes=SLOT, answer_bytes=SLOT,
                                    ctrl=ctypes.addressof(self.ctrl), ans=ctypes.addressof(self.ans), check=self.cb)
        self.lib = native.library()
        assert self.lib is not None, native.unavailable_reason()

    def check(self, ring: int, waited_s: float) -> int:
        self.calls.append(waited_s)
        return int(waited_s >= self.stop_after_s)

    def serve(self, limit: int = -1) -> int:
        # no layer is ever reached here (messages other than CMD_MOE_NATIVE are left to Python)
        layers = (ctypes.c_void_p * 1)()
        return self.lib.mt_ep_serve(ctypes.addressof(self.st), ctypes.addressof(layers), 1, None, 0, None, None,
                                    None, limit, 1)


def control(cmd: int, layer: int = 0, n: int = 0) -> torch.Tensor:
    b = bytearray(SLOT)
    struct.pack_into("<3q", b, 0, cmd, layer, n)
    return torch.frombuffer(b, dtype=torch.uint8)


def test_a_message_of_another_kind_is_left_for_the_python_reader(rings):
    w, r, ans = rings
    f = Follower(r, ans)
    w.send(control(CMD_PING))
    assert f.serve() == 0 and r.got == 0  # peeked, not taken
    got = r.recv()  # the Python loop takes it from the same counters
    assert struct.unpack_from("<3q", got.numpy()) == (CMD_PING, 0, 0) and r.got == 1
    w.send(control(CMD_MOE_NATIVE, layer=5))  # a layer the loop does not serve (1 layer here): Python's too
    assert f.serve() == 0 and r.got == 1
    assert struct.unpack_from("<3q", r.recv().numpy())[:2] == (CMD_MOE_NATIVE, 5)
    assert r.w[r.acked] == 1  # C acknowledged message 1 when it asked for message 2


def test_a_sleeping_c_reader_is_woken_by_a_python_writer(rings):
    w, r, ans = rings
    r.st.spin_s = 0.0  # sleep on the futex at once
    f = Follower(r, ans)
    t = threading.Timer(0.15, lambda: w.send(control(CMD_PING)))
    t0 = time.monotonic()
    t.start()
    assert f.serve() == 0  # ctypes released the GIL: the timer thread wrote while C slept
    took = time.monotonic() - t0
    t.join()
    assert 0.14 < took < 2.0 and f.st.sleeps == 1
    assert f.calls  # the 20 ms liveness callback ran while it slept


def test_the_liveness_callback_ends_a_wait_with_its_error(rings):
    w, r, ans = rings
    f = Follower(r, ans, stop_after_s=0.1)
    t0 = time.monotonic()
    assert f.serve() == -1
    assert 0.09 < time.monotonic() - t0 < 2.0
    assert f.st.err == native_ep.E_CHECK and f.st.err_ring == 0 and f.calls[-1] >= 0.1
    assert all(b > a for a, b in zip(f.calls, f.calls[1:]))  # every 20 ms, not once per poll
    assert len(f.calls) <= 0.1 / shm.CHECK_EVERY_S + 3


def test_a_slot_out_of_sequence_is_reported(rings):
    w, r, ans = rings
    f = Follower(r, ans)
    w.send(control(CMD_PING))
    w.w[r.seq[0]] = 7  # slot 0 claims message 7 while the reader expects 1
    assert f.serve() == -1
    assert (f.st.err, f.st.err_ring, f.st.err_a, f.st.err_b) == (native_ep.E_SEQ, 0, 7, 1)
