"""Record post-RoPE queries and attention column statistics from inside a transformers forward.

transformers routes every attention call of Llama/Mistral/Qwen-style models through a registered
attention function that receives the post-RoPE queries and the layer's full post-RoPE keys and
values. kvsim registers one such function. While a `ForwardRecorder` is active it computes the
attention itself (chunked, with column sums, see `kvsim.kernels`) and keeps the query rows the
TraceSet stores; otherwise it is plain SDPA, so a model left in this mode still works.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsim.errors import KvsimError
from kvsim.kernels import causal_attention_column_stats
from kvsim.shape import ModelShape

ATTENTION_NAME = "kvsim_capture"

_active: ContextVar[ForwardRecorder | None] = ContextVar("kvsim_forward_recorder", default=None)


class ForwardRecorder:
    """What one sample's capture keeps, per layer, as the model runs.

    shape: the model's shape; sliding layers attend over their window only.
    keep_queries_from: first prompt row whose query is kept (every later query, continuation
        included, is kept too).
    row_splits: prompt rows that cut the column statistics into separately summed groups.
    """

    def __init__(self, shape: ModelShape, keep_queries_from: int, row_splits: Sequence[int] = ()) -> None:
        n_layers = shape.n_layers
        self.shape = shape
        self.keep_queries_from = keep_queries_from
        self.row_splits = tuple(row_splits)
        self.query_rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.colsum: list[torch.Tensor | None] = [None] * n_layers
        self.colsq: list[torch.Tensor | None] = [None] * n_layers

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention output [1, n, heads, head_dim] for query [1, heads, n, d], key/value [1, kv_heads, T, d]."""
        if query.shape[0] != 1:
            raise ValueError("capture runs one sample at a time (batch size 1)")
        n, total = query.shape[2], key.shape[2]
        scaling, window = self.shape.scaling, self.shape.windows[layer]
        if n == 1:
            output = decode_attention(query, key, value, scaling, window)[0]
            self.query_rows[layer].append(query[0].clone())
        elif n == total:
            stats = causal_attention_column_stats(query[0], key[0], value[0], scaling, self.row_splits, window=window)
            self.colsum[layer], self.colsq[layer] = stats.colsum, stats.colsq
            self.query_rows[layer].append(query[0, :, self.keep_queries_from :].clone())
            output = stats.output
        else:
            raise ValueError("capture supports one prefill forward followed by single-token steps")
        return output.transpose(0, 1).unsqueeze(0)

    def queries(self, layer: int) -> torch.Tensor:
        """[heads, rows, head_dim]: the kept prompt rows followed by one row per decode step."""
        return torch.cat(self.query_rows[layer], dim=1)


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """[b, heads, 1, d]: one new token's attention over the cache, or over its last `window`
    tokens in a sliding layer. Capture and the live sliding layer both call it, on the same keys."""
    if window is not None:
        key, value = key[:, :, -window:], value[:, :, -window:]
    return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)


def causal_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Plain causal attention [b, n, heads, d] of the newest n tokens over all T cached ones.

    Registered attention functions get no mask from transformers, so causality is rebuilt here:
    the queries are the last n positions (bottom-right aligned, which SDPA's `is_causal` is not when
    n < T, as in a chunked forward over a filled cache); a sliding layer also hides keys more than
    `window` − 1 positions back.
    """
    n, total = query.shape[2], key.shape[2]
    mask = None
    if window is not None or 1 < n < total:
        columns = torch.arange(total, device=query.device)[None, :]
        rows = torch.arange(total - n, total, device=query.device)[:, None]
        mask = (columns <= rows) & (columns > rows - (window or total))
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None and n > 1, scale=scale, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous()


def check_no_padding(attention_mask: torch.Tensor | None, window: int | None = None) -> None:
    """Refuse padded inputs: the policy cache and the capture decide per sequence, batch size 1,
    and neither reads a padding mask. A causal mask alone (what transformers builds without
    padding) hides nothing at or before a query's own position, within its sliding `window` if any."""
    if attention_mask is None:
        return
    if attention_mask.dim() == 2:
        hidden = attention_mask == 0
    else:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        n, total = visible.shape[-2:]
        columns = torch.arange(total, device=visible.device)[None, :]
        rows = torch.arange(total - n, total, device=visible.device)[:, None]
        expected = (columns <= rows) & (columns > rows - (window or total))
        hidden = expected & ~visible
    if bool(hidden.any()):
        raise KvsimError("kvsim attention does not read padding masks: run one unpadded sequence at a time (batch size 1)")


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    check_no_padding(attention_mask, sliding_window)
    recorder = _active.get()
    if recorder is None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return causal_sdpa(query, key, value, scale, sliding_window), None
    return recorder.attend(module.layer_idx, query, key, value), None


AttentionInterface.register(ATTENTION_NAME, _attention)
# transformers builds no mask at all for an attention function it does not know the mask format of,
# so padding would pass unseen: ask for SDPA's (None when plain causal), which `check_no_padding` reads.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def recording(model: PreTrainedModel, recorder: ForwardRecorder):
    """Route `model`'s attention through `recorder` for the duration of the block."""
    return attention_routed(model, ATTENTION_NAME, _active, recorder)


@contextmanager
def attention_routed(model: PreTrainedModel, name: str, active: ContextVar, value):
    """Switch `model` to the registered attention function `name`, with `active` set to `value`
    (what that function reads), for the duration of the block; the model's own is restored after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    token = active.set(value)
    try:
        yield value
    finally:
        active.reset(token)
        model.set_attn_implementation(previous)
