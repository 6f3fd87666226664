"""`kvsim capture`: run the live model on a workload and write a TraceSet."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from kvsim.cli.common import console, progress_bars, reports_errors
from kvsim.cli.traces import print_summary
from kvsim.paths import ensure_writable_dir
from kvsim.traces.capture import STORAGE_DTYPES, CaptureSettings, capture_traceset, prepare_prompts
from kvsim.traces.models import DEFAULT_MODEL, load_context_length, load_model, load_tokenizer
from kvsim.traces.store import MODES
from kvsim.traces.workloads import Haystack, build_workload


class ModeChoice(str, Enum):
    aware = "query-aware"
    agnostic = "query-agnostic"
    both = "both"

    def modes(self) -> tuple[str, ...]:
        return MODES if self is ModeChoice.both else (self.value,)


@reports_errors
def capture(
    out: Path = typer.Option(..., "--out", help="TraceSet folder to write (re-running resumes it)."),
    model: str = typer.Option(
        DEFAULT_MODEL, help="Bundled name, .gguf file, local Hugging Face folder, or hub id (org/name)."
    ),
    workload: str = typer.Option(
        "default", help="Built-in task, comma-separated mix of tasks, 'default', or a .jsonl file."
    ),
    samples: int = typer.Option(8, min=1, help="Number of samples (rows taken from a .jsonl file)."),
    window: int = typer.Option(64, help="Observation window: last prompt positions whose queries are stored."),
    max_new_tokens: int = typer.Option(32, help="Length cap of the full-cache greedy continuation."),
    context_tokens: int = typer.Option(1500, help="Target context length in model tokens (built-in tasks)."),
    seed: int = typer.Option(0, help="Workload seed: the same seed gives the same prompts."),
    mode: ModeChoice = typer.Option(
        ModeChoice.aware, help="Which evaluation mode(s) to store: compress the prompt with or without the question."
    ),
    dtype: str = typer.Option("float16", help=f"Storage dtype of K, V, Q: {', '.join(STORAGE_DTYPES)}."),
    top_k: int = typer.Option(20, help="Log-probabilities kept per continuation position."),
    kvzip: bool = typer.Option(
        False, "--kvzip", help="Also record KVzip's context-reconstruction scores (one more prefill-sized pass per mode)."
    ),
    haystack: Path | None = typer.Option(None, help="UTF-8 text file to use as filler instead of the Python docs."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
) -> None:
    """Capture attention traces of a model on a workload into a TraceSet folder.

    Example: [bold]kvsim capture --workload passkey,multikey --samples 16 --out traces/smol[/]
    """
    settings = CaptureSettings(
        window=window, max_new_tokens=max_new_tokens, top_k=top_k, storage_dtype=dtype, modes=mode.modes(), kvzip=kvzip
    )
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    filler = Haystack.from_file(haystack) if haystack else Haystack.default()
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    workload_samples = build_workload(
        workload, samples, seed=seed, context_tokens=context_tokens, count_tokens=count_tokens, haystack=filler
    )
    # Bad input fails before the model loads, and before --out is created.
    max_positions = load_context_length(model, trust_remote_code=trust_remote_code)
    prompts = prepare_prompts(workload_samples, tokenizer, settings, max_positions)
    ensure_writable_dir(out, "output folder")
    workload_meta = {
        "spec": workload,
        "seed": seed,
        "context_tokens": context_tokens,
        "haystack": filler.source,
        "haystack_sha256": filler.sha256,
    }
    with progress_bars() as progress:
        loading = progress.add_task(f"loading {model}", total=1)
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        progress.update(loading, completed=1)
        bar = progress.add_task("capturing", total=len(workload_samples))
        counts = {"captured": 0, "skipped": 0}

        def report(event: str, sample) -> None:
            if event in counts:
                counts[event] += 1
                progress.advance(bar)
            else:
                verb = "prefill + generate" if event == "prefill" else "writing"
                progress.update(bar, description=f"{verb} {sample.sample_id}")

        traceset = capture_traceset(loaded, workload_samples, out, settings, workload_meta, report, prompts)
        progress.update(bar, description="captured")
    console.print(f"captured {counts['captured']} samples, skipped {counts['skipped']} already complete")
    print_summary(traceset)
