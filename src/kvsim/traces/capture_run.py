"""`kvsim.capture(...)`: the whole of `kvsim capture` as one Python call returning the TraceSet.

The order is the CLI's, chosen so bad input fails fast: the tokenizer alone sizes and renders the
workload (every sample checked) before the model's weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvsim.paths import ensure_writable_dir
from kvsim.traces.capture import CaptureSettings, capture_traceset, prepare_prompts
from kvsim.traces.models import DEFAULT_MODEL, load_context_length, load_model, load_tokenizer
from kvsim.traces.store import TraceSet
from kvsim.traces.workloads import Haystack, Sample, build_workload


def capture(
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    workload: str = "default",
    samples: int = 8,
    context_tokens: int = 1500,
    seed: int = 0,
    settings: CaptureSettings | None = None,
    haystack: str | Path | None = None,
    trust_remote_code: bool = False,
    on_loading: Callable[[str], None] = lambda event: None,
    report: Callable[[str, Sample], None] = lambda event, sample: None,
) -> TraceSet:
    """Capture `samples` of `workload` from `model` into the TraceSet folder `out` (re-running resumes it).

    model, workload, samples, context_tokens, seed, haystack: as the CLI options of the same names.
    settings: window, max_new_tokens, top_k, storage dtype and modes (default `CaptureSettings()`).
    on_loading hears "model" before the weights load and "loaded" after; report(event, sample)
    hears each sample's "prefill", "write", "captured" or "skipped".
    """
    settings = settings or CaptureSettings()
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    filler = Haystack.from_file(Path(haystack)) if haystack else Haystack.default()
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    workload_samples = build_workload(
        workload, samples, seed=seed, context_tokens=context_tokens, count_tokens=count_tokens, haystack=filler
    )
    # Bad input fails before the model loads, and before `out` is created.
    max_positions = load_context_length(model, trust_remote_code=trust_remote_code)
    prompts = prepare_prompts(workload_samples, tokenizer, settings, max_positions)
    out = ensure_writable_dir(Path(out), "output folder")
    workload_meta = {
        "spec": workload,
        "seed": seed,
        "context_tokens": context_tokens,
        "haystack": filler.source,
        "haystack_sha256": filler.sha256,
    }
    on_loading("model")
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    on_loading("loaded")
    return capture_traceset(loaded, workload_samples, out, settings, workload_meta, report, prompts)
