"""Map a kvsim policy onto NVIDIA kvpress presses, for users who apply compression with kvpress.

kvpress compresses once, at prefill, by a compression ratio (the share of tokens removed), so only
prefill-once policies that drop tokens and are budgeted as a fraction map. The press is described
as a small tree of (class name, arguments), rendered both as Python source (the exported script)
and as live objects (`build_press`, when kvpress is installed), so the two never disagree.

The mapping follows kvpress 0.5 (whose pin requires transformers < 5.3, as kvsim's own range does):
- window_attention → SnapKVPress(window_size, kernel_size): kvpress always keeps the window and
  pools with an average; a kvsim policy pooling with max maps approximately (noted in the script);
- key_norm → KnormPress; last_query → TOVAPress; random → RandomPress; accumulated_attention →
  ObservedAttentionPress (needs eager attention); recency with sinks → StreamingLLMPress(n_sink);
- key_diff → KeyDiffPress; lag_kv → LagKVPress(n_sink, lag_size, cross_scoring);
  expected_attention → ExpectedAttentionPress(n_future_positions, n_sink, use_covariance, use_vnorm,
  epsilon) (kvpress reads every prompt query, kvsim its window); kvzip with global_top → KVzipPress
  (layerwise=False); pool "chunk" → ChunkKVPress(press, chunk_length) around the scorer's press;
- allocators: uniform → the press itself; pyramid → PyramidKVPress(beta) (window scorers only);
  head_adaptive → AdaKVPress(press, alpha_safeguard); free_vector → PerLayerCompressionPress with
  each layer's ratio from its share of the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsim.errors import KvsimError
from kvsim.paths import write_atomically
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy


@dataclass
class Press:
    name: str
    arguments: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def source(self) -> str:
        rendered = ", ".join(f"{key}={value.source() if isinstance(value, Press) else repr(value)}" for key, value in self.arguments.items())
        return f"{self.name}({rendered})"

    def classes(self) -> set[str]:
        nested = [value.classes() for value in self.arguments.values() if isinstance(value, Press)]
        return {self.name}.union(*nested)

    def all_notes(self) -> list[str]:
        nested = [note for value in self.arguments.values() if isinstance(value, Press) for note in value.all_notes()]
        return self.notes + nested


def press_for(policy: Policy, budget: Budget) -> Press:
    """The press tree equivalent to `policy` at `budget`, or a KvsimError saying why there is none."""
    if policy.schedule.interval is not None:
        raise KvsimError(f"policy {policy.name!r} evicts during decoding ({policy.schedule.name}); kvpress presses compress once at prefill")
    if policy.retention.name != "drop":
        raise KvsimError(f"policy {policy.name!r} keeps evicted tokens ({policy.retention.name}); kvpress presses drop them")
    if not isinstance(budget.value, float):
        raise KvsimError("kvpress presses take a compression ratio: export a fractional budget such as 0.1")
    ratio = round(1.0 - budget.value, 6)
    allocator = policy.allocator
    if policy.scorer.name == "kvzip":
        if allocator.name != "global_top":
            raise KvsimError("kvpress's KVzipPress competes for budget across all layers and heads: pair kvzip with the global_top allocator")
        return Press("KVzipPress", {"compression_ratio": ratio, "n_sink": policy.scorer.sinks, "layerwise": False})
    if allocator.name == "pyramid":
        scorer = _scorer_press(policy, ratio)
        if scorer.name != "SnapKVPress":
            raise KvsimError("kvpress's PyramidKVPress scores like SnapKV: only a window_attention scorer maps with pyramid budgets")
        return Press("PyramidKVPress", {**scorer.arguments, "beta": allocator.beta}, scorer.notes)
    if allocator.name == "uniform":
        return _scorer_press(policy, ratio)
    if allocator.name == "head_adaptive":
        return Press("AdaKVPress", {"press": _scorer_press(policy, ratio), "alpha_safeguard": allocator.alpha})
    if allocator.name == "free_vector":
        total = sum(allocator.weights)
        layers = len(allocator.weights)
        ratios = [round(min(1.0, max(0.0, 1.0 - budget.value * layers * w / total)), 6) for w in allocator.weights]
        note = "per-layer ratios are clipped to [0, 1], so a layer asking for more than its whole prompt keeps it all"
        return Press("PerLayerCompressionPress", {"press": _scorer_press(policy, ratio), "compression_ratios": ratios}, [note])
    raise KvsimError(f"allocator {allocator.name!r} has no kvpress counterpart: use uniform, pyramid, head_adaptive or free_vector")


def _scorer_press(policy: Policy, ratio: float) -> Press:
    press = _token_press(policy, ratio)
    if getattr(policy.scorer, "pool", None) == "chunk":
        return Press("ChunkKVPress", {"press": press, "chunk_length": policy.scorer.kernel})
    return press


def _token_press(policy: Policy, ratio: float) -> Press:
    scorer = policy.scorer
    if scorer.name == "window_attention":
        notes = [] if scorer.pool == "avg" else [f"kvsim pools scores with {scorer.pool}; kvpress's SnapKV averages"]
        return Press("SnapKVPress", {"compression_ratio": ratio, "window_size": scorer.window, "kernel_size": scorer.kernel}, notes)
    if scorer.name == "key_norm":
        return Press("KnormPress", {"compression_ratio": ratio})
    if scorer.name == "key_diff":
        return Press("KeyDiffPress", {"compression_ratio": ratio})
    if scorer.name == "lag_kv":
        arguments = {"n_sink": scorer.sinks, "lag_size": scorer.lag, "cross_scoring": scorer.cross_scoring}
        return Press("LagKVPress", {"compression_ratio": ratio, **arguments})
    if scorer.name == "expected_attention":
        arguments = {"n_future_positions": scorer.future, "n_sink": scorer.sinks, "use_covariance": scorer.covariance,
                     "use_vnorm": scorer.value_norm, "epsilon": scorer.epsilon}
        note = f"kvpress takes query statistics from every prompt query; kvsim from the last {scorer.window}"
        return Press("ExpectedAttentionPress", {"compression_ratio": ratio, **arguments}, [note])
    if scorer.name == "last_query":
        return Press("TOVAPress", {"compression_ratio": ratio})
    if scorer.name == "random":
        return Press("RandomPress", {"compression_ratio": ratio, "seed": scorer.seed})
    if scorer.name == "accumulated_attention":
        return Press("ObservedAttentionPress", {"compression_ratio": ratio}, ["ObservedAttentionPress needs attn_implementation='eager'"])
    if scorer.name == "recency":
        return Press("StreamingLLMPress", {"compression_ratio": ratio, "n_sink": policy.schedule.sinks})
    raise KvsimError(
        f"scorer {scorer.name!r} has no kvpress counterpart: use window_attention, key_norm, key_diff, lag_kv, "
        "expected_attention, kvzip, last_query, random, accumulated_attention or recency"
    )


def build_press(policy: Policy, budget: Budget):
    """The kvpress press object (kvpress must be installed: `pip install "kvsim[kvpress]"`)."""
    press = press_for(policy, budget)  # a policy without a counterpart says so, kvpress or not
    try:
        import kvpress
    except ImportError as err:
        raise KvsimError('kvpress is not installed: `pip install "kvsim[kvpress]"` (kvpress needs transformers < 5.3)') from err
    return _instantiate(press, kvpress)


def _instantiate(press: Press, module):
    arguments = {key: _instantiate(value, module) if isinstance(value, Press) else value for key, value in press.arguments.items()}
    return getattr(module, press.name)(**arguments)


def write_press_script(policy: Policy, budget: Budget, path: str | Path) -> Path:
    """A runnable Python file defining `press`, with how to use it."""
    press = press_for(policy, budget)
    notes = "".join(f"# Note: {note}\n" for note in press.all_notes())
    text = (
        f"# kvpress equivalent of kvsim policy {policy.name!r} at budget {budget.label} (written by `kvsim export --kvpress`).\n"
        f"{notes}"
        f"# Use: pipe = transformers.pipeline('kv-press-text-generation', model=..., device=...)\n"
        f"#      pipe(context, question=question, press=press)['answer']\n"
        f"from kvpress import {', '.join(sorted(press.classes()))}\n\n"
        f"press = {press.source()}\n"
    )
    path = Path(path)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))
    return path
