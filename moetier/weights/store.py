"""The ``store`` tier: routed experts read one at a time from the safetensors files.

:class:`SlotLayout` fixes where one expert's tensors live inside a *slot* (a preallocated,
4096-byte aligned byte buffer owned by :class:`moetier.weights.cache.SlotPool`): ``gate_up
[2I, H]``, ``down [H, I]`` and the optional biases, each 4096-aligned so every provider hands
the matmuls identically laid-out contiguous tensors (bit-identical results). Quantized
experts use :class:`StoredSlotLayout` instead: the slot holds the expert's *stored* bytes (each
QTensor's data / scale / zero parts), read through the reader (``reader.read``) and copied in.

:class:`ExpertStore` reads one expert straight into a slot:

* the byte ranges of the expert's tensors come from the checkpoint headers (per-expert
  tensors, or the expert's rows of fused ``[E, ...]`` tensors), sorted by file offset and
  merged, so an expert whose tensors are adjacent on disk is one ``os.preadv`` with several
  destination buffers;
* ``io="buffered"`` uses ``os.preadv`` and then ``posix_fadvise(DONTNEED)`` on the range just
  read, so the kernel page cache does not keep a second copy of what the cache already
  holds (under a cgroup memory cap the page cache is charged to the process);
  ``io="direct"`` opens the files with ``O_DIRECT`` and reads aligned blocks into a
  per-thread aligned bounce buffer (no page cache at all), falling back to buffered reads
  where the file system refuses it; ``io="auto"`` tries direct first. A direct read keeps up
  to ``io_depth`` aligned chunks in flight (:func:`read_aligned`; one ``preadv`` at queue depth
  1 left a virtio/NVMe device idle between requests and serialised the bounce->slot copy after
  the read: ``bench/bench_store_io.py`` measures ~1.4x with 4 chunks), and each chunk is copied
  into the slot by the thread that read it, overlapping the other chunks' reads;
* nothing is memory-mapped.

When the checkpoint dtype differs from the runtime dtype the bytes go through a per-thread
staging buffer and are converted with ``Tensor.copy_`` (the same rounding as ``.to``).
Families whose :class:`~moetier.models.base.ExpertReader` overrides ``read`` (layouts the
generic reader does not know) are served through ``reader.read`` and copied into the slot.

Values are checked finite (one ``aminmax`` pass) the first time each expert is read; every
read checks its length. Every failure (short read of a file truncated mid-run, an I/O
error, a NaN) raises
:class:`~moetier.errors.WeightError` naming the layer, expert, tensor and file. The caller
(the cache) never marks a slot valid unless the read returned.

A device tier (GPU memory above host RAM) would add a slot pool on the device and a copy
from a pinned host slot; the store itself only ever fills host memory.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetier.errors import WeightError
from moetier.models.base import ExpertReader, ExpertWeights
from moetier.weights.fileio import OpenFiles

ALIGN = 4096
IO_MODES = ("auto", "buffered", "direct")
DEFAULT_IO_DEPTH = 4  # concurrent aligned chunk reads per expert (bench/bench_store_io.py)
# experts read at once by the tiered provider's I/O threads: 2 x 4 chunks keep 8 reads in flight,
# and one expert's tail (last chunk, finite check, hand-over) overlaps the next one's reads
# (bench/bench_hierarchy.py --io-threads 1,2: bench/README.md)
DEFAULT_IO_THREADS = 2
# scheduling priority of the threads issuing store reads, relative to the process (nice steps; 0 =
# same as compute): each read completion needs a little CPU (copy out, issue the next read) and on
# a busy machine the compute threads would otherwise delay it while the device idles. Lowering the
# nice value needs CAP_SYS_NICE; without it the threads keep the process's (tried once).
IO_NICE = -5
_nice_ok: bool | None = None


def io_thread_priority() -> None:
    """Give the calling thread :data:`IO_NICE` over the process's nice value when permitted."""
    global _nice_ok
    if _nice_ok is False or IO_NICE == 0 or not hasattr(os, "setpriority"):
        return
    try:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(-20, min(19, base + IO_NICE)))
        _nice_ok = True
    except OSError:
        _nice_ok = False
MIN_CHUNK = 512 << 10  # never split a read below this many bytes per chunk
MAX_GAP = 64 << 10  # direct reads span gaps up to this many bytes between an expert's tensors


def _align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pread_full(fd: int, mv: memoryview, offset: int) -> int:
    """``preadv`` into all of ``mv`` (retrying partial reads); returns bytes read (short at EOF)."""
    done = 0
    while done < len(mv):
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            break
        done += got
        if got % ALIGN:  # O_DIRECT short read at end of file
            break
    return done


def read_aligned(fd: int, mv: memoryview, offset: int, nbytes: int, pool: ThreadPoolExecutor | None,
                 depth: int, on_chunk: Callable[[int, int], None] | None = None) -> int:
    """Read ``nbytes`` at ``offset`` into ``mv[:nbytes]`` as up to ``depth`` aligned chunks in flight.

    ``offset``/``nbytes`` are multiples of :data:`ALIGN` (O_DIRECT). The first chunk is read on the
    calling thread, the rest on ``pool``. ``on_chunk(lo, hi)`` (bytes of ``mv`` just read) runs in
    the thread that read the chunk, so copying one chunk out overlaps the others' reads. Every chunk
    has returned (or failed) before this returns, so nothing writes into ``mv`` afterwards. Returns
    the bytes read contiguously from ``offset`` (less than ``nbytes`` only at end of file); the first
    ``OSError`` of any chunk is raised.
    """
    chunk = max(MIN_CHUNK, _align_up(-(-nbytes // max(1, depth))))

    def one(lo: int, n: int) -> int:
        got = _pread_full(fd, mv[lo : lo + n], offset + lo)
        if on_chunk is not None and got:
            on_chunk(lo, lo + got)
        return got

    bounds = [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]
    if pool is None or len(bounds) == 1:
        return one(0, nbytes)
    futs = [pool.submit(one, o, n) for o, n in bounds[1:]]
    results: list[int | BaseException] = []
    try:
        results.append(one(*bounds[0]))
    except BaseException as e:  # still wait for the other chunks below
        results.append(e)
    for f in futs:
        try:
            results.append(f.result())
        except BaseException as e:
            results.append(e)
    done = 0
    for (_, n), r in zip(bounds, results):
        if isinstance(r, BaseException):
            raise r
        done += r
        if r < n:
            break
    return done


@dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of one expert's tensors inside a slot (all 4096-aligned)."""

    dtype: torch.dtype
    hidden: int
    intermediate: int
    gate_up_bias: bool = False
    down_bias: bool = False

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def _parts(self) -> list[tuple[str, tuple[int, ...]]]:
        H, I = self.hidden, self.intermediate
        parts: list[tuple[str, tuple[int, ...]]] = [("gate_up", (2 * I, H)), ("down", (H, I))]
        if self.gate_up_bias:
            parts.append(("gate_up_bias", (2 * I,)))
        if self.down_bias:
            parts.append(("down_bias", (H,)))
        return parts

    def byte_offsets(self) -> dict[str, tuple[int, int]]:
        """``part name -> (byte offset in the slot, bytes)``."""
        return {k: (off, math.prod(shape) * self.itemsize) for k, (off, shape) in self.offsets().items()}

    def offsets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        out, off = {}, 0
        for name, shape in self._parts():
            out[name] = (off, shape)
            off = _align_up(off + math.prod(shape) * self.itemsize)
        return out

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot (a multiple of 4096)."""
        off = 0
        for _, shape in self._parts():
            off = _align_up(off + math.prod(shape) * self.itemsize)
        return off

    @property
    def expert_bytes(self) -> int:
        """Bytes of the expert's tensors (without alignment padding)."""
        return sum(math.prod(s) for _, s in self._parts()) * self.itemsize

    variants = 1  # one structure for every layer (see LayeredSlotLayout)

    def variant_of(self, layer: int | None) -> int:
        return 0

    def all_views(self, buf: torch.Tensor) -> list[ExpertWeights]:
        """``views`` of ``buf`` for every variant (index = ``variant_of(layer)``)."""
        return [self.views(buf)]

    def views(self, buf: torch.Tensor, layer: int | None = None) -> ExpertWeights:
        """The expert's tensors as views of ``buf`` (a uint8 slot buffer)."""
        t = {}
        for name, (off, shape) in self.offsets().items():
            n = math.prod(shape) * self.itemsize
            t[name] = buf[off : off + n].view(self.dtype).view(shape)
        return ExpertWeights(t["gate_up"], t["down"], t.get("gate_up_bias"), t.get("down_bias"))


class StoredSlotLayout:
    """Slot layout over the storage tensors of a quantized expert (``ExpertWeights.leaves``:
    each QTensor's data / scale / zero parts and the plain biases), each 4096-aligned, so a
    slot holds the expert's stored bytes. Built from one expert read as a template (every
    expert of a model has the same structure); same interface as :class:`SlotLayout`."""

    def __init__(self, template: ExpertWeights):
        self.template = template.with_leaves({k: t.to("meta") for k, t in template.leaves()})
        self.parts: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []  # key, dtype, shape, offset
        off = 0
        for k, t in template.leaves():
            self.parts.append((k, t.dtype, tuple(t.shape), off))
            off = _align_up(off + _nbytes(t))
        self.slot_bytes = off
        self.expert_bytes = sum(math.prod(sh) * torch.empty(0, dtype=dt).element_size()
                                for _, dt, sh, _ in self.parts)

    def byte_offsets(self) -> dict[str, tuple[int, int]]:
        """``leaf key -> (byte offset in the slot, bytes)``."""
        return {k: (off, math.prod(shape) * torch.empty(0, dtype=dt).element_size())
                for k, dt, shape, off in self.parts}

    variants = 1

    def variant_of(self, layer: int | None) -> int:
        return 0

    def all_views(self, buf: torch.Tensor) -> list[ExpertWeights]:
        """``views`` of ``buf`` for every variant (index = ``variant_of(layer)``)."""
        return [self.views(buf)]

    def views(self, buf: torch.Tensor, layer: int | None = None) -> ExpertWeights:
        """The expert (QTensors whose parts are contiguous views of ``buf``, a uint8 slot)."""
        t = {}
        for k, dt, shape, off in self.parts:
            n = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
            t[k] = buf[off : off + n].view(dt).view(shape)
        return self.template.with_leaves(t)


class LayeredSlotLayout:
    """Stored slot layouts of a model whose layers store their experts differently (llama.cpp's
    Q4_K_M / Q3_K_M... recipes give ``ffn_down_exps`` Q6_K in some layers and Q4_K in the others):
    one :class:`StoredSlotLayout` per distinct structure, a slot as large as the largest.
    ``views(buf, layer)`` views a slot with that layer's structure; ``variant_of(layer)`` names it
    (the tiered provider makes each slot's views once per variant)."""

    def __init__(self, layouts: list[StoredSlotLayout], variant_of_layer: dict[int, int]):
        self.layouts, self._of = layouts, dict(variant_of_layer)
        self.variants = len(layouts)
        self.slot_bytes = max(x.slot_bytes for x in layouts)
        self.expert_bytes = max(x.expert_bytes for x in layouts)  # what a slot must hold

    def variant_of(self, layer: int | None) -> int:
        return 0 if layer is None else self._of[layer]

    def byte_offsets(self) -> dict[str, tuple[int, int]]:
        return self.layouts[0].byte_offsets()

    def views(self, buf: torch.Tensor, layer: int | None = None) -> ExpertWeights:
        return self.layouts[self.variant_of(layer)].views(buf)

    def all_views(self, buf: torch.Tensor) -> list[ExpertWeights]:
        return [x.views(buf) for x in self.layouts]


@dataclass(frozen=True)
class _Piece:
    """One contiguous byte range of the checkpoint and where it goes in the slot."""

    file: Path
    offset: int
    nbytes: int
    tensor: str
    dst: str  # slot part: gate_up / down, or a quantized expert's leaf key (gate.data, down.scale, ...)
    dst_start: int  # byte offset inside that part (in the runtime dtype: gate rows, then up rows)
    src_dtype: torch.dtype | None  # None: stored bytes copied as they are (quantized leaves)


class ExpertStore:
    """Reads single routed experts from the checkpoint into slot buffers (no mmap).

    Thread-safe: reads are positional, per-thread staging buffers.
    """

    def __init__(self, reader: ExpertReader, io: str = "auto", check_finite: bool = True,
                 drop_page_cache: bool = True, io_depth: int = DEFAULT_IO_DEPTH, readers: int = 1):
        if io not in IO_MODES:
            raise WeightError(f"io mode {io!r}: expected one of {', '.join(IO_MODES)}")
        if io_depth < 1:
            raise WeightError(f"io_depth {io_depth}: expected a positive number of reads in flight")
        if readers < 1:
            raise WeightError(f"readers {readers}: expected a positive number of reading threads")
        self.io_depth = io_depth
        self.readers = readers  # threads calling read_into at once (the chunk pool serves them all)
        self._pool: ThreadPoolExecutor | None = None
        self.reader = reader
        self.spec = reader.spec
        self.dtype = reader.dtype
        self.check_finite = check_finite
        self.drop_page_cache = drop_page_cache
        quantized = bool(getattr(reader, "quantized", False))
        custom = type(reader).read is not ExpertReader.read or not hasattr(reader, "layers")
        self._generic = custom or quantized
        self._stored = False  # quantized experts read from their stored byte ranges (no reader.read)
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._files = OpenFiles()
        self.io_requested = io
        self.io = "buffered" if io == "buffered" else "direct"
        s = self.spec
        if self._generic:
            # learn the layout (biases, intermediate width) from one expert
            layer0 = s.moe_layer_ids[0]
            w = reader.read(layer0, 0)
            self.layout: SlotLayout | StoredSlotLayout | LayeredSlotLayout
            if w.quantized:
                self.layout = self._stored_layout(reader, layer0, w)
            else:
                self.layout = SlotLayout(self.dtype, w.down.shape[0], w.intermediate,
                                         w.gate_up_bias is not None, w.down_bias is not None)
        else:
            self.layout = SlotLayout(self.dtype, s.hidden_size, s.expert_intermediate_size)
        self._pieces: dict[tuple[int, int], list[list[_Piece]]] = {}
        self._verified: set[tuple[int, int]] = set()  # experts whose values were checked finite once
        if quantized and not custom and isinstance(self.layout, StoredSlotLayout):
            self._stored = self._stored_pieces_match(w)
            self._generic = not self._stored
        self._dst = self.layout.byte_offsets()
        if self.io == "direct" and not self._direct_supported():
            self.io = "buffered"

    def _stored_layout(self, reader: ExpertReader, layer0: int,
                       w: ExpertWeights) -> StoredSlotLayout | LayeredSlotLayout:
        """One stored layout, or (layers storing their experts in different formats / shapes,
        told apart from the headers) one per distinct structure, each learnt from one expert read."""
        sig = getattr(reader, "layer_structure", None)
        try:
            keys = {layer: sig(layer) for layer in self.spec.moe_layer_ids} if sig is not None else {}
        except (KeyError, WeightError, AttributeError):  # a family reader with other names: one layout
            keys = {}
        if len(set(keys.values())) <= 1 or None in keys.values():
            return StoredSlotLayout(w)
        layouts: list[StoredSlotLayout] = []
        index: dict[Any, int] = {}
        of: dict[int, int] = {}
        for layer, k in keys.items():
            if k not in index:
                index[k] = len(layouts)
                layouts.append(StoredSlotLayout(w if layer == layer0 else reader.read(layer, 0)))
            of[layer] = index[k]
        return LayeredSlotLayout(layouts, of)

    # ----- layout of one expert on disk -----
    def pieces(self, layer: int, expert: int) -> list[list[_Piece]]:
        """Groups of file-contiguous pieces (one ``preadv`` each) of one expert."""
        key = (layer, expert)
        got = self._pieces.get(key)
        if got is not None:
            return got
        t = self.reader.layers.get(layer)
        if t is None or not 0 <= expert < self.spec.num_experts:
            raise WeightError(f"layer {layer} expert {expert}: no such routed expert")
        plist = self._stored_pieces(layer, expert) if self._stored else self._plain_pieces(layer, expert)
        plist.sort(key=lambda p: (str(p.file), p.offset))
        groups: list[list[_Piece]] = []
        for p in plist:
            last = groups[-1][-1] if groups else None
            if last is not None and last.file == p.file and last.offset + last.nbytes == p.offset:
                groups[-1].append(p)
            else:
                groups.append([p])
        self._pieces[key] = groups
        return groups

    def _plain_pieces(self, layer: int, expert: int) -> list[_Piece]:
        t = self.reader.layers[layer]
        idx = self.reader.index
        assert isinstance(self.layout, SlotLayout)
        up_start = self.layout.intermediate * self.layout.hidden * self.layout.itemsize  # bytes of the gate rows
        plist: list[_Piece] = []

        def whole(name: str, dst: str, start: int) -> None:
            info = idx.info(name)
            plist.append(_Piece(info.file, info.start, info.nbytes, name, dst, start, info.torch_dtype))

        def rows(name: str, dst: str, start: int) -> None:
            info = idx.info(name)
            row = math.prod(info.shape[1:]) * info.itemsize
            plist.append(_Piece(info.file, info.start + expert * row, row, name, dst, start, info.torch_dtype))

        if t.fused:
            if t.gate_up is not None:
                rows(t.gate_up, "gate_up", 0)
            else:
                rows(t.gate, "gate_up", 0)
                rows(t.up, "gate_up", up_start)
            rows(t.down, "down", 0)
        else:
            whole(t.gate.format(e=expert), "gate_up", 0)
            whole(t.up.format(e=expert), "gate_up", up_start)
            whole(t.down.format(e=expert), "down", 0)
        return plist

    def _stored_pieces(self, layer: int, expert: int) -> list[_Piece]:
        """A quantized expert's stored parts (data / scale of each QTensor, plain weights) as byte
        ranges of the files, each copied as it is into the slot leaf of the same key."""
        from moetier.weights.safetensors_io import QInfo

        t = self.reader.layers[layer]
        idx = self.reader.index
        if t.fused:
            names = ([("gate_up", t.gate_up)] if t.gate_up is not None else [("gate", t.gate), ("up", t.up)])
            names.append(("down", t.down))
        else:
            names = [(f, n.format(e=expert)) for f, n in (("gate", t.gate), ("up", t.up), ("down", t.down))]
        plist: list[_Piece] = []
        for field, name in names:
            info = idx.info(name)
            parts = info.parts.items() if isinstance(info, QInfo) else [(None, info)]
            for k, part in parts:
                start, n = part.start, part.nbytes
                if t.fused:
                    n = math.prod(part.shape[1:]) * part.itemsize
                    start += expert * n
                # stored bytes as they are (``_stored_pieces_match``: same bytes as the slot leaf)
                plist.append(_Piece(part.file, start, n, part.name, field if k is None else f"{field}.{k}", 0, None))
        return plist

    def _stored_pieces_match(self, template: ExpertWeights) -> bool:
        """The stored parts map one to one onto the slot leaves, byte for byte (no zero points to
        unpack, no dtype conversion): then quantized experts are read straight from their byte
        ranges; otherwise through ``reader.read``."""
        from moetier.weights.safetensors_io import SafetensorsIndex

        if not isinstance(getattr(self.reader, "index", None), SafetensorsIndex):
            return False
        leaves = dict(template.leaves())
        try:
            plist = self._stored_pieces(self.spec.moe_layer_ids[0], 0)
        except (WeightError, KeyError, AttributeError):
            return False
        if sorted(p.dst for p in plist) != sorted(leaves) or any(k.endswith(".zero") for k in leaves):
            return False
        idx = self.reader.index
        for piece in plist:
            leaf = leaves[piece.dst]
            if piece.nbytes != _nbytes(leaf) or ("." not in piece.dst and idx.tensors[piece.tensor].torch_dtype
                                                 != leaf.dtype):
                return False
        return True

    def file_of(self, layer: int, expert: int) -> str:
        if self._generic:
            return str(self.reader.index.dir)
        return ", ".join(sorted({str(p.file) for g in self.pieces(layer, expert) for p in g}))

    # ----- file descriptors -----
    def _fd(self, path: Path, direct: bool) -> int:
        return self._files.fd(path, direct)

    def _direct_supported(self) -> bool:
        if not hasattr(os, "O_DIRECT") or self._generic:
            return False
        try:
            g = self.pieces(self.spec.moe_layer_ids[0], 0)[0][0]
            fd = self._fd(g.file, True)
            buf = self._bounce(ALIGN)
            os.preadv(fd, [memoryview(buf)[:ALIGN]], 0)
            return True
        except OSError:
            return False

    def _chunk_pool(self) -> ThreadPoolExecutor | None:
        """Threads reading the 2nd..``io_depth``-th chunk of a direct read (shared by all callers)."""
        if self.io_depth <= 1:
            return None
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor((self.io_depth - 1) * self.readers,
                                                    thread_name_prefix="moetier-io-chunk",
                                                    initializer=io_thread_priority)
        return self._pool

    def _bounce(self, n: int) -> mmap.mmap:
        b = getattr(self._tls, "bounce", None)
        if b is None or len(b) < n:
            b = mmap.mmap(-1, _align_up(max(n, 1 << 20)))  # page-aligned anonymous memory
            self._tls.bounce = b
        return b

    def _staging(self, n: int) -> torch.Tensor:
        s = getattr(self._tls, "staging", None)
        if s is None or s.numel() < n:
            s = torch.empty(n, dtype=torch.uint8)
            self._tls.staging = s
        return s[:n]

    # ----- reads -----
    def read_into(self, layer: int, expert: int, buf: torch.Tensor) -> ExpertWeights:
        """Read expert ``(layer, expert)`` into slot buffer ``buf``; returns views of it.

        Returns the number of bytes read from the files via :attr:`last_bytes` of the thread.
        """
        w = self.layout.views(buf, layer)
        if self._generic:
            try:
                src = self.reader.read(layer, expert)
            except OSError as e:
                raise WeightError(f"layer {layer} expert {expert}: read failed in {self.reader.index.dir} "
                                  f"({e.strerror or e})") from None
            dst = dict(w.leaves())
            for key, t in src.leaves():  # plain: gate_up / down / biases; quantized: stored parts
                if key in dst:
                    dst[key].copy_(t)
            self._tls.last_bytes = src.nbytes
            return w
        groups = self.pieces(layer, expert)
        convert = [p for g in groups for p in g if p.src_dtype is not None and p.src_dtype != self.dtype]
        stage = self._staging(sum(p.nbytes for p in convert)) if convert else None
        dsts: list[list[torch.Tensor]] = []
        st = 0
        for group in groups:
            ds = []
            for p in group:
                if p.src_dtype is not None and p.src_dtype != self.dtype:  # staged, converted below
                    assert stage is not None
                    ds.append(stage[st : st + p.nbytes])
                    st += p.nbytes
                else:
                    off = self._dst[p.dst][0] + p.dst_start
                    ds.append(buf[off : off + p.nbytes])
            dsts.append(ds)
        self._read_groups(layer, expert, groups, dsts)
        if convert:
            parts = {"gate_up": w.gate_up.view(-1), "down": w.down.view(-1)}
            i0 = 0
            for p in convert:
                assert stage is not None
                src = stage[i0 : i0 + p.nbytes].view(p.src_dtype)
                e0 = p.dst_start // self.layout.itemsize
                parts[p.dst][e0 : e0 + src.numel()].copy_(src)
                i0 += p.nbytes
        if self.check_finite and (layer, expert) not in self._verified:
            self._check_finite(layer, expert, w)
            self._verified.add((layer, expert))
        self._tls.last_bytes = sum(p.nbytes for g in groups for p in g)
        return w

    def _check_finite(self, layer: int, expert: int, w: ExpertWeights) -> None:
        """NaN / Inf in the expert's float values (plain weights; a quantized expert's float
        scales): one cheap pass, the first time the expert is read."""
        if self._stored:
            checks = [(k, t) for k, t in w.leaves() if t.dtype in (torch.float32, torch.bfloat16, torch.float16)]
        else:
            checks = [("gate/up", w.gate_up), ("down", w.down)]
        for name, t in checks:
            lo, hi = torch.aminmax(t)  # NaN propagates, +-Inf shows
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                tensors = sorted({p.tensor for g in self.pieces(layer, expert) for p in g})
                what = "scales" if self._stored else "weights"
                raise WeightError(f"{self.file_of(layer, expert)}: layer {layer} expert {expert}: {name} {what} "
                                  f"contain NaN or Inf values (tensors {', '.join(tensors)})")

    def last_bytes(self) -> int:
        """Bytes read from the files by this thread's last :meth:`read_into`."""
        return int(getattr(self._tls, "last_bytes", 0))

    def _fail(self, layer: int, expert: int, p: _Piece, what: str) -> WeightError:
        return WeightError(f"{p.file}: layer {layer} expert {expert}: tensor '{p.tensor}' {what}")

    def _read_groups(self, layer: int, expert: int, groups: list[list[_Piece]],
                     dsts: list[list[torch.Tensor]]) -> None:
        """Direct: groups of one file closer than :data:`MAX_GAP` are one aligned span (the bytes
        between them are read and dropped: a quantized expert's parts are separated by small
        tensors such as ``weight_shape``); buffered: one ``preadv`` per group."""
        if self.io == "direct":
            spans: list[tuple[list[_Piece], list[torch.Tensor]]] = []
            for g, d in zip(groups, dsts):
                if spans:
                    last = spans[-1][0][-1]
                    if last.file == g[0].file and 0 <= g[0].offset - (last.offset + last.nbytes) <= MAX_GAP:
                        spans[-1][0].extend(g)
                        spans[-1][1].extend(d)
                        continue
                spans.append((list(g), list(d)))
            try:
                for pieces, ds in spans:
                    self._read_direct(layer, expert, pieces, ds)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise self._fail(layer, expert, groups[0][0], f"read failed ({e.strerror})") from None
                self.io = "buffered"  # the file system refused O_DIRECT: fall back for good
        for g, d in zip(groups, dsts):
            self._read_buffered(layer, expert, g, d)

    def _read_buffered(self, layer: int, expert: int, group: list[_Piece], dsts: list[torch.Tensor]) -> None:
        start = group[0].offset
        n = sum(p.nbytes for p in group)
        try:
            fd = self._fd(group[0].file, False)
            views = [d.numpy() for d in dsts]
            done = 0
            while done < n:
                # skip buffers already filled
                bufs, acc = [], 0
                for v in views:
                    if acc + v.nbytes <= done:
                        acc += v.nbytes
                        continue
                    bufs.append(v[max(0, done - acc):])
                    acc += v.nbytes
                got = os.preadv(fd, bufs, start + done)
                if got <= 0:
                    size = os.fstat(fd).st_size
                    bad = self._piece_at(group, start + done)
                    raise self._fail(layer, expert, bad,
                                     f"ends at byte {bad.offset + bad.nbytes} but the file has only {size} bytes "
                                     "(truncated or replaced while running?)")
                done += got
            if self.drop_page_cache:
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise self._fail(layer, expert, group[0], f"read failed ({e.strerror})") from None

    @staticmethod
    def _piece_at(group: list[_Piece], offset: int) -> _Piece:
        for p in group:
            if p.offset <= offset < p.offset + p.nbytes:
                return p
        return group[-1]

    def _read_direct(self, layer: int, expert: int, pieces: list[_Piece], dsts: list[torch.Tensor]) -> None:
        """The aligned span over ``pieces`` (one file, ascending offsets) -> bounce buffer
        (``io_depth`` chunks in flight), each chunk copied into the slot by the thread that read it."""
        start = pieces[0].offset
        end = max(p.offset + p.nbytes for p in pieces)
        a0 = start // ALIGN * ALIGN
        a1 = _align_up(end)
        bounce = self._bounce(a1 - a0)
        fd = self._fd(pieces[0].file, True)
        src = torch.frombuffer(bounce, dtype=torch.uint8, count=a1 - a0)
        spans = [(p.offset - a0, p.offset - a0 + p.nbytes, d) for p, d in zip(pieces, dsts)]

        def copy_out(lo: int, hi: int) -> None:  # bounce bytes [lo, hi) have arrived
            for s0, s1, d in spans:
                c0, c1 = max(lo, s0), min(hi, s1)
                if c0 < c1:
                    d[c0 - s0 : c1 - s0].copy_(src[c0:c1])

        done = read_aligned(fd, memoryview(bounce), a0, a1 - a0, self._chunk_pool(), self.io_depth, copy_out)
        if a0 + done < end:
            size = os.fstat(fd).st_size
            bad = self._piece_at(pieces, a0 + done)
            raise self._fail(layer, expert, bad,
                             f"ends at byte {bad.offset + bad.nbytes} but the file has only {size} bytes "
                             "(truncated or replaced while running?)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._files.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
