"""A small, strict safetensors reader/writer on numpy (bfloat16 and float8 through ml_dtypes).

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {...}}, then the raw little-endian tensor bytes. We parse it ourselves so that a
truncated or corrupt file gives a CheckpointError naming the file and the key, and so that bfloat16
needs no torch. Tensors are read through a read-only memory map: only the tensors asked for are
paged in.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError, CheckpointFileNotFound

DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """Header parsed and validated on open; `get(key)` returns a read-only numpy view."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointFileNotFound(f"{self.path}: safetensors file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, "
                                      "no 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self._entries = {}
        for key, e in header.items():
            try:
                dt = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: key {key!r}: malformed header entry {e!r} "
                                      f"(unknown dtype or bad shape/offsets)") from None
            nbytes = math.prod(shape) * dt.itemsize
            if any(d < 0 for d in shape) or end - begin != nbytes or begin < 0 or end > data_len:
                raise CheckpointError(
                    f"{self.path}: key {key!r}: data_offsets [{begin}, {end}) do not hold a "
                    f"{e['dtype']} tensor of shape {list(shape)} inside the {data_len}-byte data "
                    "area (truncated or corrupt file)")
            self._entries[key] = (dt, shape, begin, end)
        self._mmap: Optional[np.memmap] = None

    def keys(self):
        return list(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def shape(self, key) -> tuple:
        return self._entry(key)[1]

    def dtype(self, key) -> np.dtype:
        return self._entry(key)[0]

    def _entry(self, key):
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: key {key!r} not found")
        return self._entries[key]

    def get(self, key) -> np.ndarray:
        dt, shape, begin, end = self._entry(key)
        if begin == end:
            return np.zeros(shape, dt)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self.data_start + begin:self.data_start + end]
        return buf.view(dt).reshape(shape)

    def close(self):
        self._mmap = None


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write tensors (name -> numpy array, any DTYPES dtype) to `path`; returns bytes written."""
    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise CheckpointError(f"{path}: key {name!r}: dtype {arr.dtype} cannot be written")
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    return 8 + len(blob) + offset


def iter_tensors(f: SafetensorsFile, keys: Optional[Iterable[str]] = None):
    for k in (f.keys() if keys is None else keys):
        yield k, f.get(k)
