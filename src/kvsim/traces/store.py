"""The TraceSet: a folder of captured samples that the simulator, search and validation read.

Layout (documented for users in the README):

    DIR/manifest.parquet          one row per (sample, evaluation mode); set metadata under the
                                  parquet key-value entry "kvsim" (JSON)
    DIR/samples/<id>.<mode>.safetensors

Every file is written to a temporary name and renamed into place, and the manifest is rewritten
after each sample, so an interrupted capture leaves a valid, smaller TraceSet that a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from kvsim.errors import KvsimError
from kvsim.paths import sha256_file, write_atomically
from kvsim.shape import ModelShape
from kvsim.traces.tensorfile import TensorFileError, map_tensors, read_header

# 2: the model's `ModelShape` under meta["model"]["shape"]; format 1 sets (layer and head counts
# under meta["model"]) still load, their shape derived from those fields.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.parquet"
SAMPLES_DIR = "samples"
METADATA_KEY = "kvsim"
MODES = ("query-aware", "query-agnostic")
MODE_TAGS = {"query-aware": "aware", "query-agnostic": "agnostic"}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise KvsimError(f"unknown mode {mode!r}: choose {' or '.join(MODES)}")

# Set metadata that must match for a re-run to resume into an existing folder.
RESUME_KEYS = ("format_version", "model", "storage_dtype", "window", "max_new_tokens", "top_k", "workload")

MANIFEST_SCHEMA = {
    "sample_id": pl.String,
    "mode": pl.String,
    "task": pl.String,
    "prompt_len": pl.Int64,  # tokens the mode compresses: the whole prompt, or the context only
    "full_prompt_len": pl.Int64,
    "context_len": pl.Int64,
    "gen_len": pl.Int64,
    "total_len": pl.Int64,
    "answers": pl.List(pl.String),
    "scoring": pl.String,
    "prediction": pl.String,
    "score": pl.Float64,
    "needle_spans": pl.List(pl.List(pl.Int64)),
    "filler_spans": pl.List(pl.List(pl.Int64)),
    "question_span": pl.List(pl.Int64),
    "file": pl.String,
    "sha256": pl.String,
    "bytes": pl.Int64,
}


@dataclass(frozen=True)
class LayerTrace:
    """One layer of one sample. Shapes: k, v [kv_heads, total_len, head_dim];
    q [heads, window + total_len − prompt_len, head_dim]; colsum, colsq [heads, prompt_len] (float32)."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    colsum: torch.Tensor
    colsq: torch.Tensor


class TraceSample:
    """One captured (sample, mode): its manifest row plus memory-mapped tensors."""

    def __init__(self, root: Path, row: dict) -> None:
        self.row = row
        self.path = root / row["file"]

    def __getattr__(self, name: str):
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        try:
            return map_tensors(self.path)
        except (OSError, TensorFileError) as err:
            raise KvsimError(f"{self.path} is unreadable ({err}): run `kvsim traces verify` and re-capture") from err

    def layer(self, index: int) -> LayerTrace:
        t = self.tensors
        prefix = f"layers.{index}."
        return LayerTrace(*(t[prefix + part] for part in ("k", "v", "q", "colsum", "colsq")))

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]


class TraceSet:
    """A TraceSet folder: `TraceSet.open(path)` to read, `TraceSet.create(path, meta)` to write."""

    def __init__(self, root: Path, manifest: pl.DataFrame, meta: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.meta = meta

    @classmethod
    def open(cls, root: str | Path) -> TraceSet:
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise KvsimError(f"{root} is not a TraceSet (no {MANIFEST}): pass a folder written by `kvsim capture`")
        try:
            manifest = pl.read_parquet(manifest_path)
            meta = json.loads(pl.read_parquet_metadata(manifest_path)[METADATA_KEY])
        except (OSError, KeyError, ValueError, pl.exceptions.PolarsError) as err:
            raise KvsimError(f"{manifest_path} is damaged or not written by kvsim ({err}): re-capture") from err
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise KvsimError(
                f"{root} uses TraceSet format {meta.get('format_version')}; this kvsim reads {READABLE_VERSIONS}"
            )
        return cls(root, manifest, meta)

    @classmethod
    def create(cls, root: str | Path, meta: dict) -> TraceSet:
        """A new TraceSet at `root`, or the one already there if it was captured with the same settings."""
        root = Path(root)
        meta = {"format_version": FORMAT_VERSION, **meta}
        if (root / MANIFEST).exists():
            existing = cls.open(root)
            for key in RESUME_KEYS:
                if existing.meta.get(key) != meta.get(key):
                    raise KvsimError(
                        f"{root} holds a TraceSet captured with another {key} "
                        f"({existing.meta.get(key)} there, {meta.get(key)} now): pass another --out, "
                        "or the same settings to resume"
                    )
            return existing
        (root / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        traceset = cls(root, pl.DataFrame(schema=MANIFEST_SCHEMA), meta)
        traceset._write_manifest()
        return traceset

    def __len__(self) -> int:
        return self.manifest.height

    def __iter__(self) -> Iterator[TraceSample]:
        return self.samples()

    def samples(self, mode: str | None = None) -> Iterator[TraceSample]:
        rows = self.manifest if mode is None else self.manifest.filter(pl.col("mode") == mode)
        for row in rows.iter_rows(named=True):
            yield TraceSample(self.root, row)

    def sample(self, sample_id: str, mode: str) -> TraceSample:
        rows = self.manifest.filter((pl.col("sample_id") == sample_id) & (pl.col("mode") == mode))
        if rows.is_empty():
            raise KvsimError(f"{self.root} has no sample {sample_id!r} in mode {mode}")
        return TraceSample(self.root, rows.row(0, named=True))

    @property
    def content_hash(self) -> str:
        """A short hash of the set's metadata and every sample file's checksum: what a result was computed on."""
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for checksum in sorted(self.manifest["sha256"].to_list()):
            digest.update(checksum.encode())
        return digest.hexdigest()[:16]

    @cached_property
    def shape(self) -> ModelShape:
        """The model's shape (derived from the model fields of format 1 sets)."""
        return ModelShape.from_stored(self.meta["model"])

    @property
    def n_layers(self) -> int:
        return self.shape.n_layers

    def is_complete(self, sample_id: str, mode: str) -> bool:
        """True when the sample is in the manifest and its file still has the recorded checksum."""
        rows = self.manifest.filter((pl.col("sample_id") == sample_id) & (pl.col("mode") == mode))
        if rows.is_empty():
            return False
        path = self.root / rows["file"][0]
        return path.is_file() and sha256_file(path) == rows["sha256"][0]

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Write one sample's file atomically, then record it in the manifest (replacing an old row)."""
        relative = f"{SAMPLES_DIR}/{row['sample_id']}.{MODE_TAGS[row['mode']]}.safetensors"
        path = self.root / relative
        file_meta = {"kvsim_format": str(FORMAT_VERSION), "sample_id": row["sample_id"], "mode": row["mode"]}
        digest: dict[str, str] = {}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=file_meta)
            digest["sha256"] = sha256_file(tmp)

        write_atomically(path, write)
        full_row = {**row, "file": relative, "sha256": digest["sha256"], "bytes": path.stat().st_size}
        keep = ~((pl.col("sample_id") == row["sample_id"]) & (pl.col("mode") == row["mode"]))
        new_row = pl.DataFrame([full_row], schema=MANIFEST_SCHEMA)
        self.manifest = pl.concat([self.manifest.filter(keep), new_row])
        self._write_manifest()

    def verify(self) -> list[str]:
        """Problems found, one line each naming the file; empty when every file is intact."""
        problems = []
        for sample in self.samples():
            problem = self._check(sample)
            if problem:
                problems.append(f"{sample.row['file']}: {problem}")
        return problems

    def _check(self, sample: TraceSample) -> str | None:
        if not sample.path.is_file():
            return "missing"
        if sha256_file(sample.path) != sample.row["sha256"]:
            return "sha256 differs from the manifest (file edited, truncated or replaced)"
        try:
            header, _, _ = read_header(sample.path)
        except TensorFileError as err:
            return str(err)
        for name, shape in expected_shapes(self.meta, sample.row).items():
            if name not in header:
                return f"tensor {name} is missing"
            if header[name]["shape"] != shape:
                return f"tensor {name} has shape {header[name]['shape']}, expected {shape}"
        return None

    def _write_manifest(self) -> None:
        metadata = {METADATA_KEY: json.dumps(self.meta, sort_keys=True)}
        write_atomically(self.root / MANIFEST, lambda tmp: self.manifest.write_parquet(tmp, metadata=metadata))


def expected_shapes(meta: dict, row: dict) -> dict[str, list[int]]:
    """The shape of every tensor a sample file must hold (the format, in one place)."""
    shape = ModelShape.from_stored(meta["model"])
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    total, prompt = row["total_len"], row["prompt_len"]
    continuation = total - prompt
    shapes = {
        "input_ids": [total],
        "continuation.topk_logprobs": [continuation, meta["top_k"]],
        "continuation.topk_ids": [continuation, meta["top_k"]],
        "continuation.token_logprobs": [continuation],
    }
    for layer in range(shape.n_layers):
        shapes[f"layers.{layer}.k"] = [kv_heads, total, head_dim]
        shapes[f"layers.{layer}.v"] = [kv_heads, total, head_dim]
        shapes[f"layers.{layer}.q"] = [heads, meta["window"] + continuation, head_dim]
        shapes[f"layers.{layer}.colsum"] = [heads, prompt]
        shapes[f"layers.{layer}.colsq"] = [heads, prompt]
    return shapes
