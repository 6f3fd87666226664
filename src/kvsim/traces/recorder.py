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

ATTENTION_NAME = "kvsim_capture"

_active: ContextVar[ForwardRecorder | None] = ContextVar("kvsim_forward_recorder", default=None)


class ForwardRecorder:
    """What one sample's capture keeps, per layer, as the model runs.

    keep_queries_from: first prompt row whose query is kept (every later query, continuation
        included, is kept too).
    row_splits: prompt rows that cut the column statistics into separately summed groups.
    """

    def __init__(self, n_layers: int, keep_queries_from: int, row_splits: Sequence[int] = ()) -> None:
        self.keep_queries_from = keep_queries_from
        self.row_splits = tuple(row_splits)
        self.query_rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.colsum: list[torch.Tensor | None] = [None] * n_layers
        self.colsq: list[torch.Tensor | None] = [None] * n_layers

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention output [1, n, heads, head_dim] for query [1, heads, n, d], key/value [1, kv_heads, T, d]."""
        if query.shape[0] != 1:
            raise ValueError("capture runs one sample at a time (batch size 1)")
        n, total = query.shape[2], key.shape[2]
        if n == 1:
            output = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)[0]
            self.query_rows[layer].append(query[0].clone())
        elif n == total:
            stats = causal_attention_column_stats(query[0], key[0], value[0], scaling, self.row_splits)
            self.colsum[layer], self.colsq[layer] = stats.colsum, stats.colsq
            self.query_rows[layer].append(query[0, :, self.keep_queries_from :].clone())
            output = stats.output
        else:
            raise ValueError("capture supports one prefill forward followed by single-token steps")
        return output.transpose(0, 1).unsqueeze(0)

    def queries(self, layer: int) -> torch.Tensor:
        """[heads, rows, head_dim]: the kept prompt rows followed by one row per decode step."""
        return torch.cat(self.query_rows[layer], dim=1)


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention [b, n, heads, d] of the newest n tokens over all T cached ones.

    Registered attention functions get no mask from transformers, so causality is rebuilt here:
    the queries are the last n positions (bottom-right aligned, which SDPA's `is_causal` is not when
    n < T, as in a chunked forward over a filled cache).
    """
    n, total = query.shape[2], key.shape[2]
    mask = None
    if 1 < n < total:
        mask = torch.arange(total, device=query.device)[None, :] <= torch.arange(total - n, total, device=query.device)[:, None]
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=n == total and n > 1, scale=scale, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous()


def check_no_padding(attention_mask: torch.Tensor | None) -> None:
    """Refuse padded inputs: the policy cache and the capture decide per sequence, batch size 1,
    and neither reads a padding mask. A causal mask alone (what transformers builds without
    padding) hides nothing at or before a query's own position."""
    if attention_mask is None:
        return
    if attention_mask.dim() == 2:
        hidden = attention_mask == 0
    else:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        n, total = visible.shape[-2:]
        causal = torch.arange(total, device=visible.device)[None, :] <= torch.arange(total - n, total, device=visible.device)[:, None]
        hidden = causal & ~visible
    if bool(hidden.any()):
        raise KvsimError("kvsim attention does not read padding masks: run one unpadded sequence at a time (batch size 1)")


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    check_no_padding(attention_mask)
    recorder = _active.get()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if recorder is None:
        return causal_sdpa(query, key, value, scale), None
    return recorder.attend(module.layer_idx, query, key, value, scale), None


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
