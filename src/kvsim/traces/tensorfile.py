"""Read safetensors files memory-mapped, and their headers alone, without pickle or a full read.

`safetensors.safe_open` copies each tensor out of the file; a simulator sweeping many policies
over many samples wants the pages the OS already has. A safetensors file is an 8-byte header
length, a JSON header (name -> dtype, shape, byte offsets) and the raw data, so mapping it is short.
"""

from __future__ import annotations

import json
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
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TensorFileError(f"header is not valid JSON ({err})") from err
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = path.stat().st_size - data_start
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _DTYPES:
            raise TensorFileError(f"tensor {name} has unsupported dtype {entry['dtype']}")
        if not 0 <= begin <= end <= data_len:
            raise TensorFileError(f"tensor {name} lies past the end of the file (truncated?)")
    return header, metadata, data_start


def map_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the file as lazily paged views on a private (copy-on-write) memory map."""
    header, _, data_start = read_header(path)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
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
