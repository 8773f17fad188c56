"""Streaming safetensors reader and writer (one tensor in host memory at a time).

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then raw
little-endian data. The `safetensors` package's numpy API cannot represent bfloat16 and its
loaders want the whole file; reading tensor by tensor with plain file reads (not mmap, whose pages
would stay in our RSS) keeps peak host memory near one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ALIGN = 8


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read."""


class SafetensorsFile:
    """Random access to the tensors of one file: `f.keys()`, `f.shape(name)`, `f.read(name)`."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file {path} does not exist") from None
        raw_len = self._f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > 100 * 2**20:
            raise SafetensorsError(f"{path}: header length {header_len} is implausible; "
                                   "not a safetensors file?")
        try:
            header = json.loads(self._f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str) -> np.ndarray:
        """Reads one tensor into a fresh numpy array."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes, "
                                   f"expected {int(np.prod(shape)) * dtype.itemsize} for "
                                   f"shape {shape} {dtype}")
        buf = bytearray(end - begin)
        self._f.seek(self._data_start + begin)
        if self._f.readinto(buf) != len(buf):
            raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
          produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a file whose header is known up front (names, shapes, dtypes); each tensor's data
    is produced on demand by `produce(name)`, written, and dropped."""
    entries: dict[str, dict] = {}
    order: list[str] = []
    offset = 0
    for name, shape, dtype in tensors:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        entries[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        order.append(name)
        offset += nbytes
    header = dict(entries)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _ALIGN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            entry = entries[name]
            arr = np.ascontiguousarray(produce(name))
            if tuple(arr.shape) != tuple(entry["shape"]) or _NAMES[arr.dtype] != entry["dtype"]:
                raise SafetensorsError(f"{path}: tensor {name!r} produced {arr.shape} "
                                       f"{arr.dtype}, header says {entry}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


def iter_checkpoint_files(model_dir: str) -> Iterator[str]:
    """The safetensors files of a Hugging Face folder: from the shard index when present."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index_path}: not a valid shard index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.exists(path):
                tensors = [k for k, v in weight_map.items() if v == name]
                raise FileNotFoundError(
                    f"{index_path} lists shard {name} (holding {len(tensors)} tensors, e.g. "
                    f"{tensors[0]!r}) but {path} does not exist")
        yield from (os.path.join(model_dir, n) for n in files)
        return
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        yield single
        return
    others = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if others:
        yield from (os.path.join(model_dir, n) for n in others)
        return
    hint = ""
    if any(n.endswith((".bin", ".pt", ".pth", ".gguf")) for n in os.listdir(model_dir)):
        hint = ("; it holds PyTorch/GGUF weights: convert them with transformers "
                "(from_pretrained then save_pretrained) first")
    raise FileNotFoundError(f"model dir {model_dir} has no model.safetensors, no "
                            f"model.safetensors.index.json and no *.safetensors files{hint}")
