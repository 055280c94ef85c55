"""Same-host shared-memory transport for the ``direct`` exchange's per-layer messages
(``MOETIER_EP_TRANSPORT=shm``; ``auto`` picks it when every rank shares this machine:
:func:`choose`). docs/expert-parallel.md, "Transport".

One segment in ``/dev/shm`` per :class:`~moetier.distributed.executor.EPGroup` (:func:`segment_name`:
from the rendezvous address, port, run id and the group's number in the process; rank 0 creates it,
replacing a stale one, every rank maps it, then rank 0 unlinks it: nothing is left behind even if
a rank is killed later). It holds, per follower rank r, two one-writer one-reader rings
(:class:`Ring`): control (rank 0 -> r) and answers (r -> rank 0), each of :data:`SLOTS` numbered
slots sized for the group's fixed-size messages (a larger message is refused with one line).

A ring's slot i carries message m (m = 1, 2, ..., slot (m - 1) % SLOTS) as ``[seq, nbytes]`` (one
64-byte line) then the payload. The writer copies the payload, then ``nbytes``, then stores ``seq
= m`` last; x86-64 keeps stores in program order (and loads in order), so a reader that sees
``seq == m`` sees the whole payload: the transport is x86-64 only (:func:`choose`). The reader
acknowledges message m (the ring's ``acked`` word) when it asks for message m + 1, so the
payload it was handed stays valid until then; the writer waits while ``SLOTS`` messages are
unacknowledged. A slot holding neither message m nor its previous occupant is an error.

Waiting (:meth:`Ring._await`): poll with ``os.sched_yield()`` for ``MOETIER_EP_SPIN_US`` (default
2000 us, as for gloo: longer than the gap between two decode steps), then sleep on the awaited
slot's seq word as a futex (the writer calls ``FUTEX_WAKE`` after every message; the kernel
compares the word under its lock, so a wake cannot be missed) in 20 ms naps; every 20 ms check
that the peer process is alive (:class:`Peer`: its pid's ``/proc`` entry, start time and state),
and give up after the step timeout (``MOETIER_EP_TIMEOUT``): both raise :class:`ShmError` naming
the rank, which the group turns into its fault (every other rank exits with one line; the server
answers 503). A writer waiting for a free slot (rare: the protocol keeps at most two messages in
flight) sleeps 50 us doubling to 1 ms instead. Spinning 2000 us with the yield measured best
on this 2-CPU VM when other jobs left the CPUs alone (no yield, or a 50-200 us spin, did worse);
under other jobs' load a polling rank lost its CPU for a scheduler slice at each yield and shm fell
behind gloo, so a yield that returns later than :data:`LOST_CPU_S` ends the poll (futex at once)
and the next :data:`NO_SPIN_S` of waits do not poll: with one CPU held by a busy loop that made
native P = 2 decode 3-7x faster than always polling, quiet no slower (docs/expert-parallel.md,
"Shared-memory transport", "Adaptive wait").

Besides the rings, each follower has two bulk buffers of ``bulk_bytes`` (rank 0 -> r: a native
multi-token step's rows that do not fit a control message; r -> rank 0: their outputs). The
message that refers to a buffer publishes it (its bytes are written before the message's seq);
the writer reuses a buffer only after the reply to the message that used it, which the direct
exchange waits for before its next message. A larger batch goes in several messages. The torch
path's batched rows and the ``replicated`` exchange stay on gloo. The segment's bytes are
allocated at creation (``posix_fallocate``), so a /dev/shm too small fails there with one line,
not with SIGBUS later.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "moetier-ep-"
SLOTS = 4  # messages in flight per ring
LINE = 64  # bytes: a ring's acked word, a slot's header and every payload start on their own line
MAGIC = 0x3170_6865_6974_656D  # b"metiehp1" little-endian: a moetier segment's first word
HEADER_BYTES = LINE  # the segment's header: magic, size, creator pid, creator start time
CHECK_EVERY_S = 0.02  # dead-peer check while waiting
LOST_CPU_S = 200e-6  # a sched_yield that returns this late gave the CPU to another job (the CPU is contended)
NO_SPIN_S = 0.5  # ... then a reader sleeps on the futex at once (no polling) for this long
SLEEP_FIRST_S, SLEEP_MAX_S = 50e-6, 1e-3  # back-off after the spin when there is no futex to sleep on
TRANSPORTS = ("gloo", "shm", "auto")
X86_64 = ("x86_64", "amd64")


_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 0, 1  # x86-64 Linux; shared (not FUTEX_PRIVATE): across processes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, value: int, timeout_s: float) -> None:
    """Sleep while the 32-bit word at ``addr`` equals ``value`` (the kernel compares under its
    lock: a wake after the change cannot be missed), at most ``timeout_s``."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(value & 0xFFFFFFFF),
                  ctypes.byref(ts), None, 0)


def futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


class ShmError(Exception):
    """A peer died, hung past the timeout, or a ring is out of sequence (the group's fault)."""


# ----- which transport -----
def identity() -> dict[str, Any]:
    """What must be equal on every rank for shared memory to connect them: host name, boot id,
    pid namespace (pids are checked for liveness), architecture; plus this process's pid and
    start time (its peers watch it)."""
    def read(p: str) -> str:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns,
            "arch": platform.machine().lower(), "shm": SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK),
            "pid": os.getpid(), "start": start_time(os.getpid())}


def choose(requested: str, ids: list[dict[str, Any]], exchange: str) -> tuple[str, str]:
    """(transport, why) for a job whose ranks reported ``ids`` (:func:`identity`, index = rank).
    ``requested``: ``MOETIER_EP_TRANSPORT`` (gloo | shm | auto). ``shm`` needs the ``direct``
    exchange, x86-64, /dev/shm and every rank on one boot of one host in one pid namespace;
    ``auto`` falls back to gloo otherwise, ``shm`` is refused with the reason (one line)."""
    if requested not in TRANSPORTS:
        raise ValueError(f"MOETIER_EP_TRANSPORT={requested!r}: expected one of {', '.join(TRANSPORTS)}")
    if requested == "gloo":
        return "gloo", "asked (MOETIER_EP_TRANSPORT=gloo)"
    why = None
    if len(ids) < 2:
        why = "one rank"
    elif exchange != "direct":
        why = f"the {exchange} exchange runs on gloo"
    elif any(d["arch"] not in X86_64 for d in ids):
        why = f"not x86-64 ({', '.join(sorted({d['arch'] for d in ids}))})"
    elif not all(d["shm"] for d in ids):
        why = f"no writable {SHM_DIR} on ranks {[r for r, d in enumerate(ids) if not d['shm']]}"
    else:
        for key, what in (("host", "host"), ("boot", "boot id"), ("pidns", "pid namespace")):
            odd = [r for r, d in enumerate(ids) if d[key] != ids[0][key]]
            if odd or not ids[0][key]:
                why = f"ranks {odd} have another {what} than rank 0" if odd else f"no {what} known"
                break
    if why is None:
        return "shm", "every rank on this machine"
    if requested == "shm":
        raise ValueError(f"MOETIER_EP_TRANSPORT=shm: {why} (use gloo or auto)")
    return "gloo", why


def segment_name(job: str) -> str:
    """``/dev/shm`` name of a job's segment (``job``: rendezvous address, port, run id, group number)."""
    return PREFIX + hashlib.sha256(job.encode()).hexdigest()[:20]


def job_key(group_no: int) -> str:
    e = os.environ
    return f"{e.get('MASTER_ADDR', '')}:{e.get('MASTER_PORT', '')}:{e.get('TORCHELASTIC_RUN_ID', '')}:{group_no}"


# ----- liveness -----
def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None when the process is gone
    or a zombie (state Z or X)."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return None if rest[0] in ("Z", "X") else int(rest[19])


class Peer:
    """A process to watch: alive while its pid exists, is not a zombie and has the start time
    it had at setup (a reused pid is another process)."""

    def __init__(self, rank: int, pid: int, start: int | None):
        self.rank, self.pid, self.start = rank, pid, start

    def check(self) -> None:
        if start_time(self.pid) != self.start:
            raise ShmError(f"shm: rank {self.rank} (pid {self.pid}) exited")


# ----- the segment -----
def ring_bytes(slot_bytes: int) -> int:
    return LINE + SLOTS * (LINE + _up(slot_bytes))


def _up(n: int) -> int:
    return -(-n // LINE) * LINE


def sweep_stale() -> list[str]:
    """Remove moetier segments whose creator is gone (killed between creating and unlinking one);
    returns their names."""
    gone = []
    for p in SHM_DIR.glob(PREFIX + "*"):
        try:
            with open(p, "rb") as f:
                w = np.frombuffer(f.read(32).ljust(32, b"\0"), dtype="<i8")
            if w[0] == MAGIC and start_time(int(w[2])) != int(w[3]):
                p.unlink()
                gone.append(p.name)
        except (OSError, ValueError):
            continue
    return gone


def create(name: str, size: int) -> mmap.mmap:
    """Rank 0: a fresh zeroed segment ``name`` of ``size`` bytes (a stale one of that name is
    replaced; other stale moetier segments are swept), its header written."""
    sweep_stale()
    path = SHM_DIR / name
    path.unlink(missing_ok=True)  # a killed creator's (the name is unique among live jobs: their store port)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # now, not as pages are first touched (SIGBUS on a full tmpfs)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    np.frombuffer(mm, dtype="<i8", count=4)[:] = [MAGIC, size, os.getpid(), start_time(os.getpid()) or 0]
    return mm


def attach(name: str, size: int) -> mmap.mmap:
    """A follower: map rank 0's segment (checked: ours, the expected size)."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR)
    try:
        got = os.fstat(fd).st_size
        if got != size:
            raise ShmError(f"shm segment {path}: {got} bytes, expected {size}")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if np.frombuffer(mm, dtype="<i8", count=2)[0] != MAGIC:
        raise ShmError(f"shm segment {path}: not a moetier segment")
    return mm


def unlink(name: str) -> None:
    (SHM_DIR / name).unlink(missing_ok=True)


class RingState(ctypes.Structure):
    """A ring end's counters and addresses, shared with the native exchange (``mt_ring`` in
    moetier/native/csrc/ep.h; keep the field order in sync): a rank's Python and C ends of one
    ring are one end."""

    _fields_ = [("acked", ctypes.c_void_p), ("seq", ctypes.c_void_p * SLOTS), ("slot_bytes", ctypes.c_long),
                ("sent", ctypes.c_int64), ("got", ctypes.c_int64), ("no_spin_until", ctypes.c_double),
                ("spin_s", ctypes.c_double), ("id", ctypes.c_int)]


class Ring:
    """One direction between two ranks in a mapped segment (see the module docstring)."""

    def __init__(self, mm: mmap.mmap, offset: int, slot_bytes: int, peer: Peer, what: str,
                 spin_s: float, timeout_s: float, me: int):
        self.slot_bytes, self.peer, self.what, self.me = slot_bytes, peer, what, me
        self.spin_s, self.timeout_s = spin_s, timeout_s
        self.w = np.frombuffer(mm, dtype="<i8")  # the whole segment as int64 words
        self.acked = offset // 8
        stride = LINE + _up(slot_bytes)
        heads = [offset + LINE + i * stride for i in range(SLOTS)]
        self.seq = [h // 8 for h in heads]
        self.views = [torch.frombuffer(mm, dtype=torch.uint8, count=slot_bytes, offset=h + LINE) for h in heads]
        self.ptrs = [v.data_ptr() for v in self.views]
        self.seq_addr = [p - LINE for p in self.ptrs]  # a slot's seq word (its low 32 bits: the futex)
        # messages written (writer) / taken (reader); after a yield lost the CPU to another job:
        # sleep at once until no_spin_until (perf_counter = CLOCK_MONOTONIC, as in C)
        self.st = RingState(acked=self.seq_addr[0] - LINE, seq=(ctypes.c_void_p * SLOTS)(*self.seq_addr),
                            slot_bytes=slot_bytes, spin_s=spin_s)
        self.checked = time.perf_counter()  # the peer's last liveness check by the writer

    sent = property(lambda self: self.st.sent, lambda self, v: setattr(self.st, "sent", v))
    got = property(lambda self: self.st.got, lambda self, v: setattr(self.st, "got", v))
    no_spin_until = property(lambda self: self.st.no_spin_until,
                             lambda self, v: setattr(self.st, "no_spin_until", v))

    def send(self, data: torch.Tensor) -> None:
        """Writer: message ``sent + 1`` (``data``: contiguous uint8) into its slot, seq last."""
        n = data.numel()
        if n > self.slot_bytes:
            raise ShmError(f"shm {self.what}: a message of {n} bytes exceeds the slot ({self.slot_bytes} bytes)")
        m = self.sent + 1
        now = time.perf_counter()
        if now >= self.checked + CHECK_EVERY_S:  # a dead reader is noticed by its writer too (rank 0's pings)
            self.peer.check()
            self.checked = now
        if self.w[self.acked] < m - SLOTS:  # the slot's previous message is not read yet
            self._await(lambda: self.w[self.acked] >= m - SLOTS, "room")
        i = (m - 1) % SLOTS
        ctypes.memmove(self.ptrs[i], data.data_ptr(), n)
        self.w[self.seq[i] + 1] = n
        self.w[self.seq[i]] = m  # last: x86-64 does not reorder stores
        futex_wake(self.seq_addr[i])  # a reader asleep on the slot (after its spin)
        self.sent = m

    def recv(self) -> torch.Tensor:
        """Reader: the next message's bytes, a view of its slot valid until the next ``recv``
        (which acknowledges it)."""
        if self.got:
            self.w[self.acked] = self.got
        m = self.got + 1
        i = (m - 1) % SLOTS
        at, old = self.seq[i], max(m - SLOTS, 0)
        if self.w[at] != m:
            def ready() -> bool:
                s = self.w[at]
                if s != m and s != old:
                    raise ShmError(f"shm {self.what}: slot {i} holds message {s}, expected {m} or {old} "
                                   "(out of sequence)")
                return s == m
            self._await(ready, "message", (self.seq_addr[i], old))
        self.got = m
        n = int(self.w[at + 1])
        return self.views[i] if n == self.slot_bytes else self.views[i][:n]

    def _await(self, ready: Callable[[], bool], what: str, futex: tuple[int, int] | None = None) -> None:
        """Poll ``ready`` (yielding the CPU) for ``spin_s``, then sleep: on the futex ``(address,
        value while not ready)`` when given (the writer wakes it), else 50 us doubling to 1 ms;
        check the peer every 20 ms; :class:`ShmError` after ``timeout_s``."""
        t0 = time.perf_counter()
        spin_end = t0 + self.spin_s if t0 >= self.no_spin_until else t0
        check, end = t0 + CHECK_EVERY_S, t0 + self.timeout_s
        nap = SLEEP_FIRST_S
        while not ready():
            now = time.perf_counter()
            if now < spin_end:
                os.sched_yield()  # the CPU goes to whoever waits for it; a pinned rank must not starve it
                if time.perf_counter() - now > LOST_CPU_S:  # another job ran: polling now costs a slice
                    spin_end, self.no_spin_until = now, now + NO_SPIN_S
                continue
            if now >= check:
                self.peer.check()
                check = now + CHECK_EVERY_S
            if now >= end:
                raise ShmError(f"shm: Timed out after {self.timeout_s:g} s waiting for rank {self.peer.rank} "
                               f"({self.what}, {what})")
            if futex is not None:
                futex_wait(futex[0], futex[1], min(CHECK_EVERY_S, end - now))
            else:
                time.sleep(nap)
                nap = min(2 * nap, SLEEP_MAX_S)


class ShmTransport:
    """The group's messages over one segment (``direct`` exchange; the interface of
    :class:`moetier.distributed.executor.GlooTransport`): rank 0 holds a control writer and an
    answer reader per follower, a follower the other ends of its two rings."""

    name = "shm"

    def __init__(self, group: Any, mm: mmap.mmap, peers: dict[int, Peer], fail: Callable[[BaseException], None]):
        self.g, self.mm, self.fail = group, mm, fail
        g = group
        ctrl, ans, head, bulk = g.ctrl_bytes, g._answer_bytes(), g.head_answer_bytes, _up(g.bulk_bytes)
        rings = ring_bytes(ctrl) + ring_bytes(ans) + (ring_bytes(head) if head else 0)
        per = rings + 2 * bulk
        spin, tmo = g.spin_s, g.timeout_s
        self.ctrl: dict[int, Ring] = {}  # rank 0: by follower; a follower: {0: its ring}
        self.ans: dict[int, Ring] = {}
        self.head: dict[int, Ring] = {}  # the native exchange's split LM head (native_ep.py): answers
        self.bulk_rows: dict[int, torch.Tensor] = {}  # rank 0 -> r: a multi-token step's rows [bulk_bytes] uint8
        self.bulk_out: dict[int, torch.Tensor] = {}  # r -> rank 0: their outputs
        for r in range(1, g.world):
            if g.rank not in (0, r):
                continue
            peer = peers[r if g.rank == 0 else 0]
            base = HEADER_BYTES + (r - 1) * per
            self.ctrl[peer.rank] = Ring(mm, base, ctrl, peer, f"control to rank {r}", spin, tmo, g.rank)
            base += ring_bytes(ctrl)
            self.ans[peer.rank] = Ring(mm, base, ans, peer, f"answers of rank {r}", spin, tmo, g.rank)
            if head:
                self.head[peer.rank] = Ring(mm, base + ring_bytes(ans), head, peer, f"head rows of rank {r}", spin,
                                            tmo, g.rank)
            if bulk:
                at = HEADER_BYTES + (r - 1) * per + rings
                self.bulk_rows[peer.rank] = torch.frombuffer(mm, dtype=torch.uint8, count=bulk, offset=at)
                self.bulk_out[peer.rank] = torch.frombuffer(mm, dtype=torch.uint8, count=bulk, offset=at + bulk)

    @staticmethod
    def size(world: int, ctrl_bytes: int, answer_bytes: int, head_bytes: int = 0, bulk_bytes: int = 0) -> int:
        """The segment's bytes: per follower a control, an answer and (``head_bytes`` > 0) a head ring,
        and two bulk buffers of ``bulk_bytes``."""
        return HEADER_BYTES + (world - 1) * (ring_bytes(ctrl_bytes) + ring_bytes(answer_bytes) +
                                             (ring_bytes(head_bytes) if head_bytes else 0) + 2 * _up(bulk_bytes))

    def _io(self, f: Callable[[Any], Any], arg: Any = None) -> Any:
        """``f(arg)`` (a ring's send or recv) counted as one step message; a failure -> the group's fault."""
        g = self.g
        if g.fault is not None:
            from moetier.distributed.executor import DistributedError
            raise DistributedError(g.fault)
        t0 = time.perf_counter()
        try:
            out = f(arg) if arg is not None else f()
        except ShmError as e:
            self.fail(e)
        t1 = time.perf_counter()
        s = g.stats
        s.comm_s += t1 - t0
        s.collectives += 1
        g._last = time.monotonic()
        return out

    def start(self) -> None:
        pass

    # rank 0
    def send(self, msgs: list[tuple[int, torch.Tensor]]) -> list[Any]:
        for r, b in msgs:
            self._io(self.ctrl[r].send, b)
        return []

    def done(self, pending: list[Any]) -> None:
        pass

    def expect(self, asked: list[int]) -> dict[int, Any]:
        return {r: r for r in asked}

    def answer(self, token: Any) -> torch.Tensor:
        return self._io(self.ans[token].recv)

    def finish(self) -> int:
        """At stop: every follower's last answer (it answers the stop)."""
        for r in self.ans:
            self.answer(r)
        return len(self.ans)

    # a follower
    def recv_ctrl(self) -> torch.Tensor:
        return self._io(self.ctrl[0].recv)

    def ctrl_read(self) -> None:
        pass

    def reply(self, ans: torch.Tensor) -> None:
        self._io(self.ans[0].send, ans)
