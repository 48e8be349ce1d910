"""Streaming safetensors: read one tensor (or a row range) at a time, write a file one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the
raw bytes (https://github.com/huggingface/safetensors#format). Reading with ``readinto`` into a fresh tensor keeps
resident memory at the tensor being converted; ``safe_open`` maps the whole file, and every page it touches counts
towards the process's resident set until the file is closed. Writing the header first (the shapes are known from the
model config) lets a file be written tensor by tensor, so no shard is ever assembled in memory.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gatedpo_mega.convert.errors import CheckpointFormatError, ShapeMismatchError

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A writable/readable byte view of a contiguous CPU tensor (bf16 included: numpy has no bf16)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file: ``names()``, ``shape(name)``, ``read(name)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._f: io.BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise CheckpointFormatError(f"{self.path}: cannot open ({e.strerror})") from None
        raw = self._f.read(8)
        size = self.path.stat().st_size
        if len(raw) < 8:
            raise CheckpointFormatError(f"{self.path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointFormatError(f"{self.path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointFormatError(f"{self.path}: not a safetensors file (unreadable header)") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            dtype = CODE_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name} has unsupported dtype {entry.get('dtype')}"
                )
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != nbytes(shape, dtype) or self._start + end > size:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name} is truncated or has inconsistent offsets"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            self._f.seek(self._start + begin)
            if self._f.readinto(_as_bytes(out)) != end - begin:
                raise CheckpointFormatError(f"{self.path}: tensor {name} is truncated")
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are declared up front, then written one at a time, in order."""

    def __init__(
        self,
        path: str | Path,
        entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order = list(entries)
        self._entries = dict(entries)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, (shape, dtype) in entries.items():
            size = nbytes(shape, dtype)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"{self.path}: wrote {name}, expected {expected}")
        shape, dtype = self._entries[name]
        if tuple(tensor.shape) != shape:
            raise ShapeMismatchError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if t.numel():
            self._f.write(_as_bytes(t))
        self._next += 1

    def abort(self) -> None:
        self._f.close()

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._order):
            raise RuntimeError(
                f"{self.path}: {len(self._order) - self._next} declared tensors were not written"
            )


def write_safetensors(
    path: str | Path,
    entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    w = SafetensorsWriter(path, entries, metadata)
    try:
        for name, t in tensors:
            w.write(name, t)
    except BaseException:
        w.abort()
        raise
    w.close()
