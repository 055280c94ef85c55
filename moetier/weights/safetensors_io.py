"""Lazy, validating safetensors reader.

A checkpoint directory holds one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. :class:`SafetensorsIndex` parses every header up front
(8-byte little-endian header length, then a JSON object ``name -> {dtype, shape,
data_offsets}``), validates it against the file size, and maps tensor name ->
:class:`TensorInfo` (file, dtype, shape, absolute byte range). Reading one tensor, or one
row-block of it (one expert of a fused ``[E, ...]`` tensor), is a single ``os.preadv`` into
a preallocated tensor: nothing is memory-mapped and nothing else is read.

Every problem raises :class:`moetier.errors.WeightError` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from moetier.errors import WeightError

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


def parse_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors file's header (reads only the header)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise WeightError(f"{path}: cannot read safetensors file ({e.strerror})") from None
    if size < 8:
        raise WeightError(f"{path}: truncated safetensors file ({size} bytes; expected an 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise WeightError(
                f"{path}: corrupt or truncated safetensors header (header length {n} bytes, file is {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise WeightError(f"{where}: header entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise WeightError(f"{where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WeightError(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise WeightError(f"{where}: invalid data_offsets {offs!r}")
        expect = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != expect:
            raise WeightError(
                f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes but shape {shape} "
                f"{dtype} needs {expect}"
            )
        if offs[1] > data_len:
            raise WeightError(
                f"{where}: data ends at byte {data_start + offs[1]} but the file has only {size} bytes "
                "(truncated file?)"
            )
        out[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    return out


class SafetensorsIndex:
    """All tensors of a checkpoint directory, by name; reads single tensors with pread."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        index_path = self.dir / INDEX_NAME
        if index_path.exists():
            files, weight_map = self._read_index(index_path)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise WeightError(f"{self.dir}: no *.safetensors files (and no {INDEX_NAME})")
        for path in files:
            for name, info in parse_header(path).items():
                if name in self.tensors:
                    raise WeightError(
                        f"{path}: tensor '{name}' is also in {self.tensors[name].file.name} (duplicate)"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != fname:
                    raise WeightError(
                        f"{index_path}: lists tensor '{name}' in {fname}, but that file has no such tensor"
                    )

    def _read_index(self, index_path: Path) -> tuple[list[Path], dict[str, str]]:
        try:
            idx = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightError(f"{index_path}: not valid JSON ({e})") from None
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise WeightError(f"{index_path}: expected a 'weight_map' object of tensor name -> file name")
        files = []
        for fname in sorted(set(wm.values())):
            p = self.dir / fname
            if Path(fname).name != fname:
                raise WeightError(f"{index_path}: shard name {fname!r} must be a plain file name")
            if not p.exists():
                raise WeightError(f"{p}: shard listed in {INDEX_NAME} is missing")
            files.append(p)
        return files, wm

    # ----- queries -----
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return info

    # ----- reads -----
    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def _pread_into(self, info: TensorInfo, out: torch.Tensor, offset: int) -> None:
        buf = out.view(-1).view(torch.uint8).numpy()
        fd, done, n = self._fd(info.file), 0, buf.nbytes
        while done < n:
            got = os.preadv(fd, [buf[done:]], offset + done)
            if got <= 0:
                raise WeightError(f"{info.file}: tensor '{info.name}': file ended early (truncated?)")
            done += got

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one whole tensor (optionally cast to ``dtype``)."""
        info = self.info(name)
        t = torch.empty(info.shape, dtype=info.torch_dtype)
        if t.numel():
            self._pread_into(info, t, info.start)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Read tensor ``name`` (or its row ``row``) straight into ``out`` (same dtype and
        element count, contiguous): no intermediate buffer. Returns ``out``."""
        info = self.info(name)
        shape = info.shape if row is None else info.shape[1:]
        if row is not None and (not info.shape or not 0 <= row < info.shape[0]):
            raise WeightError(f"{info.file}: tensor '{name}' {list(info.shape)} has no row {row}")
        if out.dtype != info.torch_dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(f"read_into({name!r}): out must be contiguous {info.dtype} with shape {list(shape)}")
        offset = info.start if row is None else info.start + row * math.prod(shape) * info.itemsize
        if out.numel():
            self._pread_into(info, out, offset)
        return out

    def read_rows(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read ``tensor[index]`` of a tensor with a leading (e.g. expert) dimension."""
        info = self.info(name)
        if not info.shape or not 0 <= index < info.shape[0]:
            raise WeightError(f"{info.file}: tensor '{name}' {list(info.shape)} has no row {index}")
        row_shape = info.shape[1:]
        t = torch.empty(row_shape, dtype=info.torch_dtype)
        if t.numel():
            self._pread_into(info, t, info.start + index * math.prod(row_shape) * info.itemsize)
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
