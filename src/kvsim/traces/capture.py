"""Run the live model with its full cache on workload samples and write what policies need.

One prefill forward and a greedy decode per sample serve both evaluation modes: keys, values and
the continuation are the same token sequence either way; only where the compressed prefix ends
differs (end of the prompt for query-aware, end of the context for query-agnostic), and the column
statistics are additive over query rows, so both modes' sums come from one pass split at the
context's end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

import kvsim
from kvsim.errors import KvsimError
from kvsim.policies.rope import Rotary
from kvsim.shape import ModelShape
from kvsim.traces.continuation import reference_tensors
from kvsim.traces.kvzip import reconstruction_scores
from kvsim.traces.models import LoadedModel, context_length, eos_token_ids
from kvsim.traces.prompt import RenderedPrompt, render_prompt
from kvsim.traces.recorder import ForwardRecorder, recording
from kvsim.traces.store import MODES, TraceSet, check_sample_id
from kvsim.traces.workloads import Sample, score

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class CaptureSettings:
    """window: prompt positions whose queries are kept (the observation window policies score with).
    max_new_tokens: length cap of the full-cache greedy continuation.
    top_k: log-probabilities kept per continuation position, for fidelity metrics.
    storage_dtype: dtype of stored keys, values and queries (statistics stay float32).
    kvzip: also run KVzip's reconstruction pass per mode and store its scores (`kvsim.traces.kvzip`)."""

    window: int = 64
    max_new_tokens: int = 32
    top_k: int = 20
    storage_dtype: str = "float16"
    modes: tuple[str, ...] = ("query-aware",)
    kvzip: bool = False

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise KvsimError(f"unknown dtype {self.storage_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise KvsimError(f"unknown mode {sorted(unknown)}: choose from {', '.join(MODES)}")
        for name in ("window", "max_new_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise KvsimError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass
class CapturedSample:
    """Everything one capture produced for a sample, before it is split by mode."""

    prompt: RenderedPrompt
    generated: list[int]
    keys: list[torch.Tensor]  # per layer [kv_heads, total, head_dim]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]  # per layer [heads, rows from `query_start`, head_dim]
    colsum: list[torch.Tensor]  # per layer [groups, heads, prompt_len]; group 1, if any, is the question
    colsq: list[torch.Tensor]
    query_start: int
    logprobs: torch.Tensor  # [rows, vocab] log-softmax for positions logprob_start−1 … total−2
    logprob_start: int
    reconstruction: dict[str, list[torch.Tensor]]  # per mode, per layer [heads, compressed prefix], when asked


def compressed_len(prompt: RenderedPrompt, mode: str) -> int:
    """How many leading tokens a mode compresses."""
    return prompt.prompt_len if mode == "query-aware" else prompt.context_end


def check_sample(sample: Sample, prompt: RenderedPrompt, settings: CaptureSettings, max_positions: int | None) -> None:
    """Reject a sample the settings or the model (its `max_positions`) cannot capture, before any model time is spent."""
    check_sample_id(sample.sample_id)
    longest = prompt.prompt_len + settings.max_new_tokens
    if max_positions is not None and longest > max_positions:
        raise KvsimError(
            f"sample {sample.sample_id} needs {longest} positions ({prompt.prompt_len} prompt tokens + "
            f"--max-new-tokens {settings.max_new_tokens}), more than the model's {max_positions}: shorten it"
        )
    for mode in settings.modes:
        if mode == "query-agnostic" and not sample.question:
            raise KvsimError(
                f"sample {sample.sample_id} has no separate question, so it cannot be captured query-agnostic: "
                "give it 'context' and 'question' fields or use --mode query-aware"
            )
        length = compressed_len(prompt, mode)
        if settings.window > length:
            raise KvsimError(
                f"--window {settings.window} is longer than sample {sample.sample_id}'s {mode} prompt "
                f"({length} tokens): lower --window or raise --context-tokens"
            )


@torch.inference_mode()
def record_sample(
    loaded: LoadedModel, prompt: RenderedPrompt, settings: CaptureSettings
) -> CapturedSample:
    """Prefill, greedy decode and one last step so the final token's key, value and query exist."""
    model = loaded.model
    starts = [compressed_len(prompt, mode) for mode in settings.modes]
    first = min(starts)
    splits = [prompt.context_end] if "query-agnostic" in settings.modes and prompt.context_end < prompt.prompt_len else []
    recorder = ForwardRecorder(loaded.shape, first - settings.window, splits)
    # No config: every layer keeps all its keys (a sliding layer's window is applied by the recorder),
    # since the trace stores every position of every layer.
    cache = DynamicCache()
    eos = eos_token_ids(loaded)
    ids = torch.tensor([prompt.input_ids])
    with recording(model, recorder):
        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=prompt.prompt_len - first + 1).logits[0]
        rows = [logits]
        generated = [int(logits[-1].argmax())]
        while generated[-1] not in eos and len(generated) < settings.max_new_tokens:
            step = model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache).logits[0]
            rows.append(step)
            generated.append(int(step[-1].argmax()))
        model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache, logits_to_keep=1)
    layers = range(loaded.shape.n_layers)
    return CapturedSample(
        prompt=prompt,
        generated=generated,
        keys=[cache.layers[i].keys[0] for i in layers],
        values=[cache.layers[i].values[0] for i in layers],
        queries=[recorder.queries(i) for i in layers],
        colsum=[recorder.colsum[i] for i in layers],
        colsq=[recorder.colsq[i] for i in layers],
        query_start=first - settings.window,
        logprobs=torch.log_softmax(torch.cat(rows).float(), dim=-1),
        logprob_start=first,
        reconstruction={
            mode: reconstruction_scores(model, loaded.tokenizer, prompt.input_ids[: compressed_len(prompt, mode)])
            for mode in (settings.modes if settings.kvzip else ())
        },
    )


def sample_tensors(captured: CapturedSample, mode: str, settings: CaptureSettings, shape: ModelShape) -> dict[str, torch.Tensor]:
    """The tensors of one mode's sample file (format: README, `store.expected_shapes`)."""
    dtype = STORAGE_DTYPES[settings.storage_dtype]
    start = compressed_len(captured.prompt, mode)
    all_ids = torch.tensor(captured.prompt.input_ids + captured.generated, dtype=torch.int64)
    logprobs = captured.logprobs[start - captured.logprob_start :]
    targets = all_ids[start:]
    topk = logprobs.topk(settings.top_k, dim=-1)
    tensors = {
        "input_ids": all_ids,
        "continuation.topk_logprobs": topk.values.contiguous(),
        "continuation.topk_ids": topk.indices.contiguous(),
        "continuation.token_logprobs": logprobs.gather(1, targets[:, None])[:, 0].contiguous(),
    }
    first_query = start - settings.window - captured.query_start
    # The question's rows (group 1) count in query-aware sums; query-agnostic sums stop at the context.
    column_groups = slice(None) if mode == "query-aware" else slice(0, 1)
    for i, (k, v, q) in enumerate(zip(captured.keys, captured.values, captured.queries)):
        tensors[f"layers.{i}.k"] = k.to(dtype=dtype, copy=True)
        tensors[f"layers.{i}.v"] = v.to(dtype=dtype, copy=True)
        tensors[f"layers.{i}.q"] = q[:, first_query:].to(dtype=dtype, copy=True)
        tensors[f"layers.{i}.colsum"] = captured.colsum[i][column_groups].sum(0)[:, :start].contiguous()
        tensors[f"layers.{i}.colsq"] = captured.colsq[i][column_groups].sum(0)[:, :start].contiguous()
        if mode in captured.reconstruction:
            tensors[f"layers.{i}.kvzip"] = captured.reconstruction[mode][i].contiguous()
    tensors.update(reference_tensors(tensors, start, settings.window, shape))
    return tensors


def manifest_row(sample: Sample, captured: CapturedSample, mode: str, prediction: str) -> dict:
    prompt = captured.prompt
    return {
        "sample_id": sample.sample_id,
        "mode": mode,
        "task": sample.task,
        "prompt_len": compressed_len(prompt, mode),
        "full_prompt_len": prompt.prompt_len,
        "context_len": prompt.context_end,
        "gen_len": len(captured.generated),
        "total_len": prompt.prompt_len + len(captured.generated),
        "answers": list(sample.answers),
        "scoring": sample.scoring,
        "prediction": prediction,
        "score": score(prediction, sample.answers, sample.scoring),
        "needle_spans": [list(span) for span in prompt.needle_spans],
        "filler_spans": [list(span) for span in prompt.filler_spans],
        "question_span": list(prompt.question_span),
    }


def traceset_metadata(loaded: LoadedModel, settings: CaptureSettings, workload: dict) -> dict:
    """Set-level metadata stored with the manifest; see `store.RESUME_KEYS` for what must match to resume.
    The model's layer and head counts stay beside its shape, as format 2 readers find them."""
    shape = loaded.shape
    model = {
        "id": loaded.source.name,
        "kind": loaded.source.kind,
        "config_hash": loaded.config_hash,
        "model_type": shape.model_type,
        "n_layers": shape.n_layers,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "shape": shape.to_json(),
        "rope": Rotary.from_model(loaded.model).to_meta(),
    }
    capture = asdict(settings)
    capture.pop("modes")
    return {
        "kvsim_version": kvsim.__version__,
        "model": model,
        "tokenizer": type(loaded.tokenizer).__name__,
        "chat_template": bool(loaded.tokenizer.chat_template),
        "compute_dtype": str(loaded.model.dtype).removeprefix("torch."),
        **capture,
        "workload": workload,
    }


def prepare_prompts(
    samples: Sequence[Sample], tokenizer: PreTrainedTokenizerBase, settings: CaptureSettings, max_positions: int | None
) -> list[RenderedPrompt]:
    """Render and check every sample; cheap, so bad input fails before the model loads.
    `max_positions` is the model's context length (`models.load_context_length`)."""
    prompts = [render_prompt(sample, tokenizer) for sample in samples]
    for sample, prompt in zip(samples, prompts):
        check_sample(sample, prompt, settings, max_positions)
    return prompts


def capture_traceset(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    out: str | Path,
    settings: CaptureSettings,
    workload: dict,
    report: Callable[[str, Sample], None] = lambda event, sample: None,
    prompts: Sequence[RenderedPrompt] | None = None,
) -> TraceSet:
    """Capture `samples` into the TraceSet at `out`, resuming one made with the same settings.

    `report(event, sample)` hears "prefill", "write", "captured" or "skipped", for progress display.
    `prompts` are the samples already rendered and checked by `prepare_prompts`, if the caller did so.
    """
    if prompts is None:
        prompts = prepare_prompts(samples, loaded.tokenizer, settings, context_length(loaded.model.config))
    traceset = TraceSet.create(out, traceset_metadata(loaded, settings, workload))
    for sample, prompt in zip(samples, prompts):
        missing = [mode for mode in settings.modes if not traceset.is_complete(sample.sample_id, mode)]
        if not missing:
            report("skipped", sample)
            continue
        report("prefill", sample)
        captured = record_sample(loaded, prompt, settings)
        prediction = loaded.tokenizer.decode(captured.generated, skip_special_tokens=True)
        report("write", sample)
        for mode in missing:
            traceset.add(manifest_row(sample, captured, mode, prediction), sample_tensors(captured, mode, settings, loaded.shape))
        report("captured", sample)
    return traceset
