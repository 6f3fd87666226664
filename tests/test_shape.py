"""`ModelShape`: computed once from a config, stored in TraceSets and exports, read back from files
written before it existed, and the one place that says which architectures kvsim runs."""

from __future__ import annotations

import json

import polars as pl
import pytest
from transformers import GPT2Config, GPT2LMHeadModel, Gemma3TextConfig

from kvsim.errors import KvsimError
from kvsim.live.export import ExportedPolicy
from kvsim.policies.presets import PRESETS
from kvsim.shape import ARCHITECTURES, ModelShape
from kvsim.sim.simulate import simulate
from kvsim.traces.models import check_supported
from kvsim.traces.store import MANIFEST, METADATA_KEY, TraceSet
from kvsim.traces.synthetic import synthetic_traceset


def gemma3_config(**overrides):
    options = dict(num_hidden_layers=6, hidden_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                   query_pre_attn_scalar=64, sliding_window=512)
    return Gemma3TextConfig(**{**options, **overrides})


def test_gemma3_shape_has_five_sliding_layers_in_six_and_its_own_scale():
    shape = ModelShape.from_config(gemma3_config())
    assert shape.windows == (512, 512, 512, 512, 512, None)
    assert shape.policy_layers == (5,) and shape.kind(0) == "sliding" and shape.kind(5) == "full"
    assert shape.scaling == 64**-0.5 != shape.head_dim**-0.5
    assert ModelShape.from_json(json.loads(json.dumps(shape.to_json()))) == shape


def test_unsupported_architectures_and_soft_capping_are_refused_in_one_line():
    with pytest.raises(KvsimError, match="model type 'gpt2' is not supported: use one of " + ", ".join(ARCHITECTURES)):
        check_supported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    with pytest.raises(KvsimError, match="soft-capping"):
        ModelShape.from_config(gemma3_config(attn_logit_softcapping=50.0))


def test_a_format_2_traceset_loads_with_its_shape_derived_from_the_model_fields(tmp_path):
    traceset = synthetic_traceset(tmp_path / "traces", n_layers=2, kv_heads=2, group=2, head_dim=16, window=32)
    manifest = tmp_path / "traces" / MANIFEST
    meta = dict(traceset.meta, format_version=2)
    meta["model"] = {key: value for key, value in meta["model"].items() if key != "shape"} | {"model_type": "llama"}
    pl.read_parquet(manifest).write_parquet(manifest, metadata={METADATA_KEY: json.dumps(meta)})
    old = TraceSet.open(tmp_path / "traces")
    assert old.shape == traceset.shape.__class__("llama", 2, 4, 2, 16, 16**-0.5, (None, None))
    assert old.verify() == []
    assert simulate(old, [PRESETS["snapkv"]], [0.5], oracle=False).samples.height == 1


def test_simulating_a_model_whose_every_layer_slides_says_there_is_nothing_to_compress(tmp_path):
    traceset = synthetic_traceset(tmp_path / "traces", n_layers=2, window=32)
    meta = dict(traceset.meta)
    meta["model"] = {**meta["model"], "shape": {**meta["model"]["shape"], "windows": [16, 16]}}
    traceset = TraceSet(traceset.root, traceset.manifest, meta)
    with pytest.raises(KvsimError, match="every layer of synthetic is sliding-window attention"):
        simulate(traceset, [PRESETS["snapkv"]], [0.5])


def test_a_version_1_export_reads_back_with_its_shape(tmp_path):
    path = tmp_path / "old.json"
    model = {"id": "m", "config_hash": "abc", "n_layers": 3, "heads": 6, "kv_heads": 2, "head_dim": 8}
    path.write_text(json.dumps({"kvsim_export": 1, "policy": PRESETS["snapkv"].to_spec(), "budget": 0.2, "model": model}))
    exported = ExportedPolicy.read(path)
    assert exported.model.shape.n_layers == 3 and exported.model.shape.policy_layers == (0, 1, 2)
    with pytest.raises(KvsimError, match="tuned for m"):
        exported.model.check(ModelShape.from_config(gemma3_config()))
