"""Random TraceSets with the exact format of a capture, for tests and for benchmarks at lengths no
CPU capture reaches (8K+ tokens). Keys, values and queries are random; the column statistics are
computed from them exactly, so they are consistent with the stored queries and keys. With
`reference=False` the set is written in format 3, without the continuation's full-cache attention,
as older captures are (the simulator then recomputes it)."""

from __future__ import annotations

from pathlib import Path

import torch

from kvsim.kernels import causal_attention_column_stats
from kvsim.shape import ModelShape
from kvsim.policies.rope import Rotary
from kvsim.traces.continuation import reference_tensors
from kvsim.traces.store import TraceSet


def synthetic_traceset(
    root: str | Path,
    *,
    samples: int = 1,
    n_layers: int = 2,
    kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 16,
    prompt_len: int = 64,
    continuation: int = 8,
    window: int = 8,
    top_k: int = 4,
    needle: tuple[int, int] | None = None,
    seed: int = 0,
    mode: str = "query-aware",
    kvzip: bool = True,
    reference: bool = True,
) -> TraceSet:
    heads, total = kv_heads * group, prompt_len + continuation
    generator = torch.Generator().manual_seed(seed)
    shape = ModelShape("synthetic", n_layers, heads, kv_heads, head_dim, head_dim**-0.5, (None,) * n_layers)
    meta = {
        "model": {
            "id": "synthetic", "config_hash": "synthetic", "model_type": "synthetic",
            "n_layers": n_layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "shape": shape.to_json(),
            # Llama's default RoPE (theta 10000): synthetic keys are not rotated, but rotating scorers need frequencies.
            "rope": Rotary(tuple(10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2))).to_meta(),
        },
        "window": window,
        "top_k": top_k,
        "storage_dtype": "float32",
        "max_new_tokens": continuation,
        "workload": {"spec": "synthetic", "seed": seed},
        "kvzip": kvzip,
        **({} if reference else {"format_version": 3}),
    }
    traceset = TraceSet.create(root, meta)
    for index in range(samples):
        tensors = {
            "input_ids": torch.randint(0, 1000, (total,), generator=generator),
            "continuation.topk_logprobs": torch.zeros(continuation, top_k),
            "continuation.topk_ids": torch.zeros(continuation, top_k, dtype=torch.int64),
            "continuation.token_logprobs": torch.zeros(continuation),
        }
        for layer in range(n_layers):
            # Spiky keys give attention real heavy hitters, as trained models have.
            keys = torch.randn(kv_heads, total, head_dim, generator=generator) * 2
            queries = torch.randn(heads, total, head_dim, generator=generator)
            stats = causal_attention_column_stats(queries[:, :prompt_len], keys[:, :prompt_len], keys[:, :prompt_len], shape.scaling)
            tensors[f"layers.{layer}.k"] = keys
            tensors[f"layers.{layer}.v"] = torch.randn(kv_heads, total, head_dim, generator=generator)
            tensors[f"layers.{layer}.q"] = queries[:, prompt_len - window :].contiguous()
            tensors[f"layers.{layer}.colsum"] = stats.colsum[0]
            tensors[f"layers.{layer}.colsq"] = stats.colsq[0]
            if kvzip:  # random stand-ins for KVzip's reconstruction scores (attention maxima in [0, 1])
                tensors[f"layers.{layer}.kvzip"] = torch.rand(heads, prompt_len, generator=generator)
        if reference:
            tensors.update(reference_tensors(tensors, prompt_len, window, shape))
        spans = [list(needle)] if needle else []
        row = {
            "sample_id": f"synthetic-{index:04d}",
            "mode": mode,
            "task": "synthetic",
            "prompt_len": prompt_len,
            "full_prompt_len": prompt_len,
            "context_len": prompt_len,
            "gen_len": continuation,
            "total_len": total,
            "answers": ["-"],
            "scoring": "all",
            "prediction": "-",
            "score": 1.0,
            "needle_spans": spans,
            "filler_spans": [],
            "question_span": [prompt_len, prompt_len],
        }
        traceset.add(row, tensors)
    return traceset
