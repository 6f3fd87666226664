"""TraceSets and CLI calls shared by the search tests (test_search*.py)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from kvsim.cli.main import app
from kvsim.traces.continuation import reference_tensors
from kvsim.traces.store import TraceSet
from kvsim.traces.synthetic import synthetic_traceset

# Layers whose continuation attends uniformly to every token, and layers whose continuation
# attends (almost) only to the last two prompt tokens.
BROAD_LAYERS, SHARP_LAYERS = (0, 2), (1, 3)


def constructed_traceset(root, samples: int = 4, prompt_len: int = 256, continuation: int = 4, head_dim: int = 16) -> TraceSet:
    """A TraceSet whose best allocation is known: nearly all of the budget in the broad layers.

    A sharp layer's queries find two hot keys at the end of the prompt (logit 12 against ~0 for the
    rest), so a budget of two tokens, the two most recent ones, serves it exactly. A broad layer's
    queries are zero: attention is uniform and the output is the mean of all values (a common mean
    plus noise), whose error shrinks with every token kept. So the best split of a fixed total gives
    the sharp layers almost nothing and the broad layers the rest.
    """
    traceset = synthetic_traceset(
        root, samples=samples, n_layers=4, kv_heads=1, group=1, head_dim=head_dim, prompt_len=prompt_len,
        continuation=continuation, window=64,
    )
    generator = torch.Generator().manual_seed(1)
    total = prompt_len + continuation
    hot = torch.zeros(head_dim)
    hot[0] = 1.0
    for sample in list(traceset):
        tensors = {name: tensor.clone() for name, tensor in sample.tensors.items()}
        for layer in range(4):
            keys = torch.randn(1, total, head_dim, generator=generator) * 0.3
            queries = torch.zeros(1, 64 + continuation, head_dim)
            if layer in SHARP_LAYERS:
                keys[0, prompt_len - 2 : prompt_len] = 12 * hot
                queries[:] = 4 * hot
            tensors[f"layers.{layer}.k"] = keys
            tensors[f"layers.{layer}.q"] = queries
            tensors[f"layers.{layer}.v"] = 1 + torch.randn(1, total, head_dim, generator=generator)
        tensors.update(reference_tensors(tensors, prompt_len, 64, traceset.shape))  # the full cache of the new tensors
        traceset.add(sample.row, tensors)
    return TraceSet.open(root)


def kvsim(*args):
    """The CLI in this process, as a user calls it."""
    return CliRunner().invoke(app, [str(arg) for arg in args])
