"""Read safetensors files memory-mapped, and their headers alone, without pickle or a full read.

`safetensors.safe_open` copies each tensor out of the file; a simulator sweeping many policies
over many samples wants the pages the OS already has. A safetensors file is an 8-byte header
length, a JSON header (name -> dtype, shape, byte offsets) and the raw data, so mapping it is short.

The header is checked as the safetensors format defines it (huggingface/safetensors, README
"Format"): every entry has a known dtype, a shape of non-negative integers and `data_offsets`
whose length is the shape's element count times the dtype's size, and the tensors' byte ranges do
not overlap. So a hand-edited header cannot make two names read the same bytes or reshape garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAX_HEADER_BYTES = 100 << 20


class TensorFileError(ValueError):
    """The file is not a readable safetensors file (truncated, edited, or something else)."""


class ChecksumMismatch(TensorFileError):
    """The file reads as safetensors, but its bytes are not the ones its manifest recorded."""


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, file metadata, byte offset where the data starts)."""
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) < 8:
            raise TensorFileError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", size_bytes)
        if header_len > _MAX_HEADER_BYTES:
            raise TensorFileError("header length is implausible")
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise TensorFileError("header is truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise TensorFileError(f"header is not valid JSON ({type(err).__name__})") from err
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError("header's __metadata__ is not a map of strings")
    data_start = 8 + header_len
    data_len = path.stat().st_size - data_start
    ranges = sorted((_checked_range(name, entry, data_len), name) for name, entry in header.items())
    for ((_, end), name), ((begin, _), next_name) in zip(ranges, ranges[1:]):
        if begin < end:
            raise TensorFileError(f"tensors {name} and {next_name} overlap in the file")
    return header, metadata, data_start


def _checked_range(name: str, entry, data_len: int) -> tuple[int, int]:
    """The byte range [begin, end) of one header entry, after checking the entry is well formed."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise TensorFileError(f"tensor {name}'s header entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise TensorFileError(f"tensor {name} has unsupported dtype {str(dtype)[:20]}")
    if not _all_naturals(shape) or not _all_naturals(offsets) or len(offsets) != 2:
        raise TensorFileError(f"tensor {name} has a malformed shape or data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise TensorFileError(f"tensor {name} lies past the end of the file (truncated?)")
    if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
        raise TensorFileError(f"tensor {name}'s shape {shape} does not match its {end - begin} bytes")
    return begin, end


def _all_naturals(values) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def map_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the file as lazily paged views on a private (copy-on-write) memory map.

    With `sha256`, the mapped bytes are hashed first and a mismatch raises `ChecksumMismatch`:
    the hash reads the pages the tensors then use, so checking costs one pass over data that a
    replay reads anyway.
    """
    header, _, data_start = read_header(path)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    if sha256 is not None and hashlib.sha256(mapped).hexdigest() != sha256:
        raise ChecksumMismatch("sha256 differs from the manifest (file edited, truncated or replaced)")
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = (
            torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.reshape(entry["shape"])
    return tensors
