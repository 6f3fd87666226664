"""The TraceSet: a folder of captured samples that the simulator, search and validation read.

Layout (documented for users in the README):

    DIR/manifest.parquet          one row per (sample, evaluation mode); set metadata under the
                                  parquet key-value entry "kvsim" (JSON)
    DIR/samples/<id>.<mode>.safetensors

Every file is written to a temporary name and renamed into place, and the manifest is rewritten
after each sample, so an interrupted capture leaves a valid, smaller TraceSet that a re-run resumes.

Nothing on disk is trusted. Opening a set checks the manifest's columns and metadata, and that
every row's `file` is the one name its sample id and mode give (so no row reaches outside the
folder). A sample's tensors are handed out only after its bytes matched the manifest's sha256, once
per file per process (`checked_tensors`), so a damaged file is an error, never a silently wrong number.
"""

from __future__ import annotations

import hashlib
import json
import re
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
from kvsim.traces.continuation import ContinuationReference
from kvsim.traces.tensorfile import ChecksumMismatch, TensorFileError, map_tensors, read_header

# 2: the model's RoPE frequencies in the metadata (`model.rope`) and, when captured with --kvzip
# (`kvzip: true`), KVzip's reconstruction scores per layer (`layers.<i>.kvzip`).
# 3: the model's `ModelShape` under `model.shape`; format 2 sets still load, their shape derived from
# the model's layer and head counts (every layer full attention, scale 1/sqrt(head_dim), as captured).
# 4: the continuation's full-cache attention of the full-attention layers (`continuation.output`,
# `continuation.lse`, `continuation.prompt_mass`, `kvsim.traces.continuation`); the simulator
# recomputes it for format 2 and 3 sets.
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
REFERENCE_FROM_VERSION = 4
MANIFEST = "manifest.parquet"
SAMPLES_DIR = "samples"
METADATA_KEY = "kvsim"
MODES = ("query-aware", "query-agnostic")
MODE_TAGS = {"query-aware": "aware", "query-agnostic": "agnostic"}
# Sample ids become file names: a conservative set that is a plain name on every filesystem.
SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Set metadata every command reads, and the model facts inside it.
REQUIRED_META = {"model": dict, "window": int, "top_k": int, "storage_dtype": str, "workload": dict}
REQUIRED_MODEL_META = {"id": str, "config_hash": str, "model_type": str, "n_layers": int, "heads": int, "kv_heads": int, "head_dim": int}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise KvsimError(f"unknown mode {mode!r}: choose {' or '.join(MODES)}")


def check_sample_id(sample_id: str) -> None:
    """Refuse an id that could not be a plain file name (a path, a dot file, odd characters)."""
    if not isinstance(sample_id, str) or not SAMPLE_ID.fullmatch(sample_id):
        raise KvsimError(
            f"sample id {sample_id!r} is not allowed: use up to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def sample_file(sample_id: str, mode: str) -> str:
    """The file of a (sample, mode), relative to the TraceSet folder: the only name a row may give."""
    return f"{SAMPLES_DIR}/{sample_id}.{MODE_TAGS[mode]}.safetensors"


# Set metadata that must match for a re-run to resume into an existing folder.
RESUME_KEYS = ("format_version", "model", "storage_dtype", "window", "max_new_tokens", "top_k", "kvzip", "workload")

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
    q [heads, window + total_len − prompt_len, head_dim]; colsum, colsq [heads, prompt_len] (float32);
    kvzip [heads, prompt_len] (float32), KVzip's reconstruction scores, None unless captured with --kvzip."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    colsum: torch.Tensor
    colsq: torch.Tensor
    kvzip: torch.Tensor | None = None


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
        return checked_tensors(self.path, self.row["sha256"])

    def layer(self, index: int) -> LayerTrace:
        t = self.tensors
        names = [f"layers.{index}.{part}" for part in ("k", "v", "q", "colsum", "colsq")]
        missing = [name for name in names if name not in t]
        if missing:
            raise KvsimError(f"{self.path} has no tensor {missing[0]}: run `kvsim traces verify {self.path.parent.parent}` and re-capture")
        return LayerTrace(*(t[name] for name in names), t.get(f"layers.{index}.kvzip"))

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    def stored_reference(self) -> ContinuationReference:
        """The continuation's full-cache attention as capture stored it (format 4), stacked over the
        full-attention layers: [policy layers, heads, ...] (`kvsim.traces.continuation`)."""
        t = self.tensors
        names = [f"continuation.{part}" for part in ("output", "lse", "prompt_mass")]
        missing = [name for name in names if name not in t]
        if missing:
            raise KvsimError(f"{self.path} has no tensor {missing[0]}: run `kvsim traces verify {self.path.parent.parent}` and re-capture")
        return ContinuationReference(*(t[name] for name in names))


# Files whose bytes matched their manifest checksum in this process: (path, size, mtime, sha256).
_verified: set[tuple[str, int, int, str]] = set()


def checked_tensors(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of a sample file, after its bytes matched `sha256` (hashed once per process)."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256)
        tensors = map_tensors(path, None if key in _verified else sha256)
    except ChecksumMismatch as err:
        raise KvsimError(f"{path}: {err}: run `kvsim traces verify {path.parent.parent}` and re-capture") from err
    except (OSError, TensorFileError) as err:
        raise KvsimError(f"{path} is unreadable ({err}): run `kvsim traces verify {path.parent.parent}` and re-capture") from err
    _verified.add(key)
    return tensors


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
        except (OSError, KeyError, ValueError, RecursionError, pl.exceptions.PolarsError) as err:
            raise KvsimError(f"{manifest_path} is damaged or not written by kvsim ({type(err).__name__}): re-capture") from err
        if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise KvsimError(f"{root} uses TraceSet format {version}; this kvsim reads {READABLE_VERSIONS}")
        problem = _meta_problem(meta) or _manifest_problem(manifest)
        if problem:
            raise KvsimError(f"{manifest_path} is damaged or not written by kvsim ({problem}): re-capture")
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
        """A short hash of the set's metadata and every sample file's data: what a result was computed on.

        Each file is checked against its manifest checksum first, so the hash describes the bytes
        on disk, not only what the manifest claims."""
        self.check_files()
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for checksum in sorted(self.manifest["sha256"].to_list()):
            digest.update(checksum.encode())
        return digest.hexdigest()[:16]

    def check_files(self, mode: str | None = None) -> None:
        """Raise KvsimError naming the first sample file (of `mode`) whose bytes differ from the manifest."""
        for sample in self.samples(mode):
            checked_tensors(sample.path, sample.row["sha256"])

    @cached_property
    def shape(self) -> ModelShape:
        """The model's shape (derived from the layer and head counts of format 2 sets)."""
        return ModelShape.from_stored(self.meta["model"])

    @property
    def n_layers(self) -> int:
        return self.shape.n_layers

    @property
    def stores_reference(self) -> bool:
        """Whether the sample files hold the continuation's full-cache attention (format 4 on)."""
        return self.meta["format_version"] >= REFERENCE_FROM_VERSION

    @property
    def statistics(self) -> frozenset[str]:
        """The optional statistics captured, named by their capture option (what `Policy.check_traces` checks)."""
        return frozenset({"kvzip"}) if self.meta.get("kvzip") else frozenset()

    def is_complete(self, sample_id: str, mode: str) -> bool:
        """True when the sample is in the manifest and its file still has the recorded checksum."""
        rows = self.manifest.filter((pl.col("sample_id") == sample_id) & (pl.col("mode") == mode))
        if rows.is_empty():
            return False
        path = self.root / rows["file"][0]
        return path.is_file() and sha256_file(path) == rows["sha256"][0]

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Write one sample's file atomically, then record it in the manifest (replacing an old row)."""
        check_sample_id(row["sample_id"])
        relative = sample_file(row["sample_id"], row["mode"])
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

    def leftover_temporary_files(self) -> list[Path]:
        """Temporary files an interrupted write left behind (harmless; safe to delete)."""
        return sorted(path for folder in (self.root, self.root / SAMPLES_DIR) for path in folder.glob(".*.tmp"))

    def _check(self, sample: TraceSample) -> str | None:
        if not sample.path.is_file():
            return "missing"
        if sha256_file(sample.path) != sample.row["sha256"]:
            return "sha256 differs from the manifest (file edited, truncated or replaced)"
        try:
            header, file_meta, _ = read_header(sample.path)
        except TensorFileError as err:
            return str(err)
        for key in ("sample_id", "mode"):
            if file_meta.get(key) != sample.row[key]:
                return f"the file says it holds {key} {file_meta.get(key)!r}, the manifest row says {sample.row[key]!r}"
        for name, shape in expected_shapes(self.meta, sample.row).items():
            if name not in header:
                return f"tensor {name} is missing"
            if header[name]["shape"] != shape:
                return f"tensor {name} has shape {header[name]['shape']}, expected {shape}"
        return None

    def _write_manifest(self) -> None:
        metadata = {METADATA_KEY: json.dumps(self.meta, sort_keys=True)}
        write_atomically(self.root / MANIFEST, lambda tmp: self.manifest.write_parquet(tmp, metadata=metadata))


def _meta_problem(meta: dict) -> str | None:
    for required, where in ((REQUIRED_META, meta), (REQUIRED_MODEL_META, meta.get("model"))):
        for key, kind in required.items():
            value = where.get(key) if isinstance(where, dict) else None
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                return f"metadata {'model.' if where is not meta else ''}{key} is missing or not a valid {kind.__name__}"
    return None


def _manifest_problem(manifest: pl.DataFrame) -> str | None:
    """What is wrong with the manifest's table: a column, a mode, an id, or a file outside the folder."""
    for column, dtype in MANIFEST_SCHEMA.items():
        if column not in manifest.columns:
            return f"no {column!r} column"
        if manifest.schema[column] != dtype:
            return f"column {column!r} is {manifest.schema[column]}, not {dtype}"
    if manifest.select(pl.col(column).is_null().any() for column in ("sample_id", "mode", "file", "sha256")).row(0) != (False,) * 4:
        return "a row without sample_id, mode, file or sha256"
    for sample_id, mode, file in manifest.select("sample_id", "mode", "file").iter_rows():
        if mode not in MODES:
            return f"unknown mode {mode[:40]!r}"
        if not SAMPLE_ID.fullmatch(sample_id):
            return f"sample id {sample_id[:40]!r} is not a plain name"
        if file != sample_file(sample_id, mode):
            return f"row {sample_id} names file {file[:80]!r}, not {sample_file(sample_id, mode)}"
    if manifest.select("sample_id", "mode").is_duplicated().any():
        return "a (sample_id, mode) appears twice"
    return None


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
        if meta.get("kvzip"):
            shapes[f"layers.{layer}.kvzip"] = [heads, prompt]
    policy_layers = len(shape.policy_layers)
    if meta["format_version"] >= REFERENCE_FROM_VERSION and policy_layers:
        shapes["continuation.output"] = [policy_layers, heads, continuation, head_dim]
        shapes["continuation.lse"] = [policy_layers, heads, continuation]
        shapes["continuation.prompt_mass"] = [policy_layers, heads, prompt]
    return shapes
