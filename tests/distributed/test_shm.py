"""The shared-memory transport's rings and segment (moetier/distributed/shm.py), in one process
(a ring's two ends are two Ring objects on one mapping); the transport under a real job is
covered by test_expert_parallel.py (every case on gloo and on auto = shm)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from moetier.distributed import shm

pytestmark = pytest.mark.skipif(platform.machine().lower() not in shm.X86_64 or not shm.SHM_DIR.is_dir(),
                                reason="the shm transport is x86-64 Linux with /dev/shm only")

SLOT = 100  # bytes: not a multiple of the 64-byte line


@pytest.fixture
def seg():
    name = f"{shm.PREFIX}test-{uuid.uuid4().hex[:12]}"
    mm = shm.create(name, shm.HEADER_BYTES + shm.ring_bytes(SLOT))
    yield name, mm
    shm.unlink(name)


def me() -> shm.Peer:
    import os

    return shm.Peer(1, os.getpid(), shm.start_time(os.getpid()))


def ends(mm, peer: shm.Peer | None = None, timeout_s: float = 5.0, spin_us: float = 50.0) -> tuple[shm.Ring, shm.Ring]:
    """(writer, reader) of the ring at the segment's first ring offset."""
    p = peer or me()
    return tuple(shm.Ring(mm, shm.HEADER_BYTES, SLOT, p, "test ring", spin_us * 1e-6, timeout_s, 0) for _ in range(2))


def msg(i: int, n: int = SLOT) -> torch.Tensor:
    return torch.arange(i, i + n, dtype=torch.int64).to(torch.uint8)


def test_ring_wraps_around_its_slots_in_order(seg):
    _, mm = seg
    w, r = ends(mm)
    sizes = [SLOT, 1, 37, SLOT, 64, 65, SLOT, 3, 99, SLOT, 12]  # 11 messages: past the 4 slots twice
    for i, n in enumerate(sizes):
        w.send(msg(i, n))
        got = r.recv()
        assert got.numel() == n and torch.equal(got, msg(i, n)), i
    # written ahead, read in order: SLOTS - 1 more while the reader holds the message it was handed
    for i in range(shm.SLOTS - 1):
        w.send(msg(100 + i))
    assert [torch.equal(r.recv(), msg(100 + i)) for i in range(shm.SLOTS - 1)] == [True] * (shm.SLOTS - 1)
    assert w.sent == r.got == len(sizes) + shm.SLOTS - 1


def test_writer_waits_for_a_free_slot_and_gives_up_at_the_timeout(seg):
    _, mm = seg
    w, r = ends(mm, timeout_s=0.3)
    for i in range(shm.SLOTS):
        w.send(msg(i))
    t0 = time.monotonic()
    with pytest.raises(shm.ShmError, match=r"Timed out after 0.3 s waiting for rank 1 \(test ring, room\)"):
        w.send(msg(9))  # the reader took none: no slot is free
    assert 0.25 < time.monotonic() - t0 < 3
    assert torch.equal(r.recv(), msg(0)) and torch.equal(r.recv(), msg(1))  # acknowledges message 1
    w.send(msg(9))  # slot 0 is free again


def test_a_slot_out_of_sequence_is_an_error(seg):
    _, mm = seg
    w, r = ends(mm)
    w.send(msg(0))
    w.w[r.seq[0]] = 7  # slot 0 claims message 7 while the reader expects 1
    with pytest.raises(shm.ShmError, match="slot 0 holds message 7, expected 1 or 0 \\(out of sequence\\)"):
        r.recv()


def test_oversized_message_is_refused(seg):
    _, mm = seg
    w, _ = ends(mm)
    with pytest.raises(shm.ShmError, match=f"a message of {SLOT + 1} bytes exceeds the slot \\({SLOT} bytes\\)"):
        w.send(msg(0, SLOT + 1))


def test_dead_peer_is_reported_with_its_rank_within_the_check_interval(seg):
    _, mm = seg
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    peer = shm.Peer(3, child.pid, shm.start_time(child.pid))
    assert peer.start is not None
    peer.check()  # alive
    _, r = ends(mm, peer, timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(shm.ShmError, match=f"shm: rank 3 \\(pid {child.pid}\\) exited"):
        r.recv()  # the child exits (a zombie until waited for: dead too)
    assert time.monotonic() - t0 < 5  # not the 30 s timeout
    child.wait()
    with pytest.raises(shm.ShmError, match="exited"):
        peer.check()
    w, _ = ends(mm, peer)  # a writer notices too (rank 0 pinging a dead idle follower), within 20 ms
    time.sleep(2 * shm.CHECK_EVERY_S)
    with pytest.raises(shm.ShmError, match=f"shm: rank 3 \\(pid {child.pid}\\) exited"):
        w.send(msg(0))


def test_hung_peer_times_out(seg):
    _, mm = seg
    _, r = ends(mm, timeout_s=0.2, spin_us=0)
    t0 = time.monotonic()
    with pytest.raises(shm.ShmError, match=r"Timed out after 0.2 s waiting for rank 1 \(test ring, message\)"):
        r.recv()
    assert time.monotonic() - t0 < 3


def test_stale_segments_are_swept_and_a_stale_name_replaced(tmp_path):
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = (f"{shm.PREFIX}test-{uuid.uuid4().hex[:12]}" for _ in range(2))
    (shm.SHM_DIR / stale).write_bytes(np.array([shm.MAGIC, 64, dead.pid, 12345], dtype="<i8").tobytes())
    mm = shm.create(live, 256)  # sweeps the stale one; its own creator (this process) is alive
    try:
        assert not (shm.SHM_DIR / stale).exists() and (shm.SHM_DIR / live).exists()
        mm2 = shm.create(live, 128)  # a segment of that name already exists (a killed creator's): replaced
        assert (shm.SHM_DIR / live).stat().st_size == 128
        assert np.frombuffer(mm2, dtype="<i8", count=3).tolist() == [shm.MAGIC, 128, os.getpid()]
        assert shm.attach(live, 128) is not None
        with pytest.raises(shm.ShmError, match="256 bytes expected|128 bytes, expected 256"):
            shm.attach(live, 256)
        assert len(mm) == 256  # the first mapping is still valid (its file is gone)
    finally:
        shm.unlink(live)
    assert not (shm.SHM_DIR / live).exists()


def ids(**odd) -> list[dict]:
    base = {"host": "h", "boot": "b", "pidns": "pid:[1]", "arch": "x86_64", "shm": True, "pid": 1, "start": 1}
    return [base, {**base, **odd}]


@pytest.mark.parametrize("odd,why", [({}, None), ({"boot": "other"}, "ranks [1] have another boot id than rank 0"),
                                     ({"host": "h2"}, "ranks [1] have another host than rank 0"),
                                     ({"pidns": "pid:[2]"}, "ranks [1] have another pid namespace than rank 0"),
                                     ({"arch": "aarch64"}, "not x86-64 (aarch64, x86_64)"),
                                     ({"shm": False}, "no writable /dev/shm on ranks [1]")])
def test_auto_takes_shm_only_when_every_rank_shares_the_machine(odd, why):
    got = shm.choose("auto", ids(**odd), "direct")
    assert got == (("shm", "every rank on this machine") if why is None else ("gloo", why))
    if why is not None:
        with pytest.raises(ValueError, match=re.escape(f"MOETIER_EP_TRANSPORT=shm: {why} (use gloo or auto)")):
            shm.choose("shm", ids(**odd), "direct")
    else:
        assert shm.choose("shm", ids(), "direct")[0] == "shm"
    assert shm.choose("gloo", ids(**odd), "direct")[0] == "gloo"


def test_replicated_exchange_and_bad_values():
    assert shm.choose("auto", ids(), "replicated") == ("gloo", "the replicated exchange runs on gloo")
    with pytest.raises(ValueError, match="MOETIER_EP_TRANSPORT=shm: the replicated exchange runs on gloo"):
        shm.choose("shm", ids(), "replicated")
    with pytest.raises(ValueError, match="MOETIER_EP_TRANSPORT='tcp': expected one of gloo, shm, auto"):
        shm.choose("tcp", ids(), "direct")


def test_identity_of_this_process():
    d = shm.identity()
    assert d["boot"] and d["pidns"].startswith("pid:") and d["start"] == shm.start_time(d["pid"])
    assert shm.choose("auto", [d, dict(d)], "direct")[0] == "shm"


def test_a_reader_that_loses_its_cpu_while_polling_sleeps_at_once(seg, monkeypatch):
    """A sched_yield that returns late (another job took the CPU) ends the poll: the reader sleeps
    on the futex for this wait and skips polling for the next ones (shm.NO_SPIN_S)."""
    _, mm = seg
    w, r = ends(mm, spin_us=1e6)  # would poll for a whole second
    yields = []

    def slow_yield():
        yields.append(time.perf_counter())
        time.sleep(2 * shm.LOST_CPU_S)  # as if another process held the CPU

    monkeypatch.setattr(shm.os, "sched_yield", slow_yield)
    import threading

    t = threading.Timer(0.05, lambda: w.send(msg(1)))
    t.start()
    t0 = time.perf_counter()
    assert torch.equal(r.recv(), msg(1))
    t.join()
    assert len(yields) == 1 and time.perf_counter() - t0 < 0.5  # one yield, then the futex (woken by send)
    assert r.no_spin_until > t0
    t = threading.Timer(0.02, lambda: w.send(msg(2)))
    t.start()
    assert torch.equal(r.recv(), msg(2)) and len(yields) == 1  # the next wait does not poll at all
    t.join()


def test_multi_token_buffer_size_from_the_environment():
    """``MOETIER_EP_SHM_BULK_MB``: the buffers hold the largest native call's rows (512 tokens x top-k
    float32 rows and ids), at most the given MiB; 0 or less than a control message's rows: none; a
    bad value is refused with one line naming the variable."""
    from moetier.distributed.executor import DistributedError, bulk_bytes

    row = 4 * 256 + 8
    assert bulk_bytes(256, 4, None) == 512 * 4 * row  # 2.1 MB < the default 16 MiB
    assert bulk_bytes(7168, 8, "") == 16 * 2**20  # DeepSeek-V3's rows: capped
    assert bulk_bytes(256, 4, "0.01") == int(0.01 * 2**20)
    assert bulk_bytes(256, 4, "0") == 0 and bulk_bytes(256, 4, "0.001") == 0  # 1048 B < 4 rows
    for bad in ("abc", "-1", "nan", "inf"):
        with pytest.raises(DistributedError, match=f"MOETIER_EP_SHM_BULK_MB='{bad}': expected a number of MiB"):
            bulk_bytes(256, 4, bad)
