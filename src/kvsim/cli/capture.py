"""`kvsim capture`: run the live model on a workload and write a TraceSet."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from kvsim.cli.common import console, progress_bars, reports_errors
from kvsim.cli.traces import print_summary
from kvsim.traces.capture import STORAGE_DTYPES, CaptureSettings
from kvsim.traces.capture_run import capture as run_capture
from kvsim.traces.models import DEFAULT_MODEL
from kvsim.traces.store import MODES


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
    with progress_bars() as progress:
        loading = progress.add_task(f"loading {model}", total=1, visible=False)
        bar = progress.add_task("capturing", total=samples, visible=False)
        counts = {"captured": 0, "skipped": 0}

        def on_loading(event: str) -> None:
            progress.update(loading, visible=True, completed=int(event == "loaded"))

        def report(event: str, sample) -> None:
            progress.update(bar, visible=True)
            if event in counts:
                counts[event] += 1
                progress.advance(bar)
            else:
                verb = "prefill + generate" if event == "prefill" else "writing"
                progress.update(bar, description=f"{verb} {sample.sample_id}")

        traceset = run_capture(
            out, model=model, workload=workload, samples=samples, context_tokens=context_tokens, seed=seed,
            settings=settings, haystack=haystack, trust_remote_code=trust_remote_code, on_loading=on_loading, report=report,
        )
        progress.update(bar, description="captured")
    console.print(f"captured {counts['captured']} samples, skipped {counts['skipped']} already complete")
    print_summary(traceset)
