"""KVzip's context reconstruction pass: how much attention each cached token gets while the model
repeats the prefix (Kim et al., 2025, arXiv 2505.23416; kvpress KVzipPress).

After the prefix is prefilled, the model reads, over that cache, a request to repeat it followed
by the prefix itself, teacher-forced:

    "\n\nRepeat the previous context exactly." + <chat template's tail> + context tokens

(KVzip's prompt; longer contexts are repeated in chunks of `CHUNK` tokens, each later request
ending with the last 8 tokens of the chunk before). For every layer and query head, a token's
score is the largest attention any repeat query gives it, with the softmax taken over the
`SINKS` first tokens, the chunk being repeated and the repeat itself (KVzip's subsampled keys).
Template tokens before the context score 0; the scorer protects the sinks.

Capture (`kvsim capture --kvzip`) and the live cache (`kvsim validate`) both call
`reconstruction_scores`, so the simulator and the live model rank with the same numbers. It costs
one extra prefill of the prefix and one forward of about its length (bench/capture.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import ContextVar

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvsim.traces.prompt import encode, template_parts
from kvsim.traces.recorder import attention_routed, causal_sdpa

FIRST_REQUEST = "\n\nRepeat the previous context exactly."
NEXT_REQUEST = "\n\nRepeat the part of the previous context exactly, starting with"
CHUNK = 2048
OVERLAP = 8
SINKS = 4
# Repeat queries scored per matmul, so a 2048-token chunk never holds its whole score matrix.
ROWS_PER_BLOCK = 256

ATTENTION_NAME = "kvsim_kvzip"


class _Reconstruction:
    """Where one repeat pass writes: per layer [heads, prefix] maxima, over the span [start, end)."""

    def __init__(self, n_layers: int, heads: int, prefix: int) -> None:
        self.scores = [torch.zeros(heads, prefix) for _ in range(n_layers)]
        self.start = self.end = 0

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, window: int | None
    ) -> torch.Tensor:
        n = query.shape[2]
        if n != key.shape[2]:  # a repeat forward over the cached prefix
            self.scores[layer][:, self.start : self.end] = self._span_maxima(query[0], key[0], scaling)
        return causal_sdpa(query, key, value, scaling, window)

    def _span_maxima(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """[heads, end − start]: each span token's largest attention from any repeat query.

        A probability is exp(logit − logsumexp of its row), so the largest over rows is taken on
        logit − logsumexp and exponentiated once: no row's full softmax is written."""
        heads, n, head_dim = query.shape
        kv_heads = key.shape[0]
        sinks = min(SINKS, self.start)
        keys = torch.cat([key[:, :sinks], key[:, self.start : self.end], key[:, -n:]], dim=1).float().transpose(-1, -2)[:, None]
        span = slice(sinks, sinks + self.end - self.start)
        repeat = keys.shape[-1] - n
        grouped = query.float().reshape(kv_heads, heads // kv_heads, n, head_dim) * scaling
        best = torch.full((kv_heads, heads // kv_heads, self.end - self.start), float("-inf"))
        for first in range(0, n, ROWS_PER_BLOCK):
            last = min(first + ROWS_PER_BLOCK, n)
            logits = torch.matmul(grouped[:, :, first:last], keys)
            future = torch.arange(n)[None, :] > torch.arange(first, last)[:, None]  # causal inside the repeat
            logits[..., repeat:].masked_fill_(future, float("-inf"))
            log_probs = logits[..., span] - torch.logsumexp(logits, -1, keepdim=True)
            best = torch.maximum(best, log_probs.amax(2))
        return best.exp().reshape(heads, -1)


_active: ContextVar[_Reconstruction | None] = ContextVar("kvsim_kvzip", default=None)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    reconstruction = _active.get()
    if reconstruction is None:
        return causal_sdpa(query, key, value, scale, sliding_window), None
    return reconstruction.attend(module.layer_idx, query, key, value, scale, sliding_window), None


AttentionInterface.register(ATTENTION_NAME, _attention)


def repeat_requests(tokenizer: PreTrainedTokenizerBase, prefix_ids: list[int]) -> Iterator[tuple[int, int, list[int]]]:
    """(start, end, ids) per chunk: the prefix span [start, end) repeated and the ids fed to repeat it."""
    head, tail = template_parts(tokenizer)
    head_ids = encode(tokenizer, head)
    context_start = len(head_ids) if prefix_ids[: len(head_ids)] == head_ids else 0
    tail_ids = encode(tokenizer, tail)
    previous: list[int] = []
    for start in range(context_start, len(prefix_ids), CHUNK):
        end = min(start + CHUNK, len(prefix_ids))
        request = encode(tokenizer, NEXT_REQUEST) + previous[-OVERLAP:] if previous else encode(tokenizer, FIRST_REQUEST)
        chunk = prefix_ids[start:end]
        yield start, end, request + tail_ids + chunk
        previous = chunk


@torch.inference_mode()
def reconstruction_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prefix_ids: list[int]) -> list[torch.Tensor]:
    """Per layer [heads, len(prefix_ids)] float32: KVzip's scores of the prefix (module docstring)."""
    config = model.config
    reconstruction = _Reconstruction(config.num_hidden_layers, config.num_attention_heads, len(prefix_ids))
    with attention_routed(model, ATTENTION_NAME, _active, reconstruction):
        cache = DynamicCache()  # no sliding layers: they cannot crop back to the prefix (the window is masked instead)
        model(input_ids=torch.tensor([prefix_ids]), past_key_values=cache, logits_to_keep=1)
        for start, end, ids in repeat_requests(tokenizer, prefix_ids):
            reconstruction.start, reconstruction.end = start, end
            model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
            cache.crop(len(prefix_ids) - cache.get_seq_length())  # back to the prefix: a negative count, as 5.2 and 5.3+ read it
    return reconstruction.scores

