"""What one layer's cache holds under a policy, and how it evicts while decoding.

`HeldLayer` is the one decode-time engine: the simulator's stepwise replay and the live cache both
run it, so a policy makes the same decisions in both places by construction, not by a second copy
kept in step. It owns the eviction state beside the tensors it describes (held positions, the
attention each held token has accumulated, the observation window of recent queries, the step
counter), attends new queries over what it holds, and on the schedule's steps builds the policy's
view (`view`), scores, selects and shrinks.

Layout: ragged per KV head. Heads may keep different numbers of tokens (per-head budgets), so the
tokens of all heads sit in one flat `[N, head_dim]` tensor, head after head, each head's tokens in
position order, with `counts[h]` tokens for head h. Nothing is padded: a per-head allocation holds
exactly the bytes its budget says. Low-precision tokens (quantize retention) sit beside them as
packed codes in the same ragged way. Keys keep the RoPE rotation of their true position. Nothing
loops over heads: attention pads the heads to the longest one for the step, in one call.

Stacks: decisions cross KV heads only through the union view and scores a layer's heads share
(`layer_mean`, per stacked layer), so for policies that score each head from its own tokens
(`stacks_layers`) the simulator stacks many layers' heads into one `HeldLayer` (`stack`) and steps
them together: one set of tensor operations per token instead of one per layer, with the same
decisions (`tests/test_stacked_replay.py`).

Bytes: `kv_bytes` is defined once here, as this layout holds them, at the serving dtype
(`KV_ELEMENT_BYTES`, fp16/bf16), whatever dtype the tensors have while measuring (float32 on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from kvsim.policies.compress import select
from kvsim.policies.lowbit import PackedTokens, packed_dim
from kvsim.policies.retention import LowBits
from kvsim.policies.policy import Policy
from kvsim.policies.rope import Rotary
from kvsim.policies.view import CacheView, causal_attention, grouped_logits

# Caches are served in fp16/bf16: every byte count is at 2 bytes per element, whatever dtype the
# tensors have while a policy is measured (float32 traces, a float32 model on a CPU).
KV_ELEMENT_BYTES = 2


def token_bytes(head_dim: int, bits: LowBits | None = None) -> int:
    """Bytes one token costs one KV head (key and value): full precision, or packed codes at the
    key's and the value's bit widths with their scales and zero points (see `kvsim.policies.lowbit`).
    Per-channel keys share theirs over a group of tokens: this counts the codes and the value's
    scale and zero point only, and `low_bytes` adds the groups'."""
    if bits is None:
        return 2 * head_dim * KV_ELEMENT_BYTES
    key_scales = 0 if bits.key_group else 2 * KV_ELEMENT_BYTES
    return packed_dim(head_dim, bits.keys) + packed_dim(head_dim, bits.values) + 2 * KV_ELEMENT_BYTES + key_scales


def _group_bytes(head_dim: int) -> int:
    """A per-channel key group's scales and zero points: one pair per channel."""
    return 2 * head_dim * KV_ELEMENT_BYTES


def low_bytes(counts: torch.Tensor, head_dim: int, bits: LowBits) -> int:
    """Bytes of `counts` [kv] low-precision tokens per head, per-channel key groups (a short last
    group costs a whole one) included."""
    held = int(counts.sum()) * token_bytes(head_dim, bits)
    if bits.key_group:
        held += int((-(-counts // bits.key_group)).sum()) * _group_bytes(head_dim)
    return held


def low_tokens_bought(spare: torch.Tensor, head_dim: int, bits: LowBits) -> torch.Tensor:
    """The most low-precision tokens per head that `spare` [kv] bytes buy: the inverse of `low_bytes`."""
    per_token = token_bytes(head_dim, bits)
    if not bits.key_group:
        return spare // per_token
    group = bits.key_group * per_token + _group_bytes(head_dim)
    whole, rest = spare // group, spare % group
    return whole * bits.key_group + ((rest - _group_bytes(head_dim)) // per_token).clamp(min=0)


def kv_bytes(full_tokens: int, low_counts: torch.Tensor, head_dim: int, bits: LowBits | None) -> int:
    """Bytes a layer holds for `full_tokens` full-precision tokens (summed over KV heads) and
    `low_counts` [kv] low-precision tokens per head. The ragged layout adds nothing, so this is exact."""
    low = int(low_counts.sum())
    return full_tokens * token_bytes(head_dim) + (low_bytes(low_counts, head_dim, bits) if low else 0)


def handed_to_retention(policy: Policy, view: CacheView, kept: torch.Tensor, budgets: torch.Tensor | None) -> torch.Tensor:
    """[kv, n] bool: the tokens of `view` not `kept` at full precision that the retention receives.

    Every evicted token, unless the retention spends part of each head's budget on low precision
    (`budgets` [kv] the heads' budgets, `kept` the full-precision tokens): then the next-best tokens
    by the policy's own selection rule (sinks, recent window, scores), as many as the bytes left
    buy (`Retention.low_budgets`). The simulator and the live cache both ask here.
    """
    evicted = ~kept if view.present is None else view.present & ~kept
    retention, head_dim = policy.retention, view.queries.shape[-1]
    full = kept.sum(1)
    bits = retention.bits(view.layer, view.n_layers)
    low = None if budgets is None else retention.low_budgets(budgets, full, token_bytes(head_dim), lambda spare: low_tokens_bought(spare, head_dim, bits))
    if low is None:
        return evicted
    if not bool(low.any()):
        return torch.zeros_like(kept)
    readable = select(policy, view, policy.scorer.score(view), (full + low).clamp(max=view.length))
    return readable & evicted


def scatter_rows(flat: torch.Tensor, head: torch.Tensor, slot: torch.Tensor, kv_heads: int, fill: float | int = 0) -> torch.Tensor:
    """Flat head-after-head rows [N, ...] as [kv, c, ...], each head's rows first, padded with `fill`
    to the longest head (`Segments.rows` gives head and slot)."""
    longest = int(slot.max()) + 1 if slot.numel() else 0
    padded = flat.new_full((kv_heads, longest, *flat.shape[1:]), fill)
    padded[head, slot] = flat
    return padded


def stacks_layers(policy: Policy, views: Sequence[CacheView]) -> bool:
    """Whether the layers of `views` (their prompt's decision) may be replayed under a stepwise policy
    as one stack of KV heads (`HeldLayer.stack`) and still decide what each would alone: its scorer
    scores each head from that head's own tokens (`Scorer.per_head`), its decode steps only drop
    tokens (`Retention.drops_while_decoding`: merging and quantizing read the keys in the union
    layout, which a stack of many layers' heads makes large), its low-precision tokens, if any, have
    the same bit widths in every layer (they share one packed tensor), and the layers share a prompt
    and an attention scale. Selection is per head."""
    retention = policy.retention
    return (
        policy.scorer.per_head
        and retention.drops_while_decoding
        and len({retention.bits(view.layer, view.n_layers) for view in views}) == 1
        and len({(view.length, view.scaling) for view in views}) == 1
    )


@dataclass
class Segments:
    """Per-KV-head token lists in one flat tensor: head 0's rows, then head 1's, ... .

    keys, values: [N, d] tensors, or PackedTokens for low-precision tokens; positions: [N] int64;
    counts: tokens per head (a Python list: it drives splits on every step).
    """

    keys: torch.Tensor | PackedTokens
    values: torch.Tensor | PackedTokens
    positions: torch.Tensor
    counts: list[int]

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> Segments:
        """The tokens of `mask` [kv, n] from [kv, n, d] tensors with [n] positions, head by head."""
        return cls(keys[mask], values[mask], positions.expand_as(mask)[mask], mask.sum(1).tolist())

    def per_head(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(tensor, self.counts)

    @cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(head [N], slot [N]): each flat row's KV head and its index inside that head's segment.
        Kept once computed: a step reads it several times, and a held layer replaces its segments
        rather than changing them."""
        counts = torch.tensor(self.counts)
        head = torch.repeat_interleave(torch.arange(len(self.counts)), counts)
        starts = torch.cumsum(counts, 0) - counts
        return head, torch.arange(head.numel()) - starts[head]

    @property
    def uniform(self) -> bool:
        return len(set(self.counts)) == 1

    @property
    def tokens(self) -> int:
        return sum(self.counts)


def interleave(old: torch.Tensor, counts: list[int], new: torch.Tensor) -> torch.Tensor:
    """Append new [kv, n, ...] rows at the end of each head's segment of flat `old` [N, ...].

    Equal counts make `old` a [kv, c, ...] tensor as it is, so one concatenation does it; otherwise
    every row is written to its place at once (a stack of many layers' heads would otherwise pay
    one copy per head)."""
    kv, n, rest = new.shape[0], new.shape[1], old.shape[1:]
    if len(set(counts)) == 1:
        return torch.cat([old.reshape(kv, counts[0], *rest), new], dim=1).reshape(-1, *rest)
    sizes = torch.tensor(counts)
    ends = torch.cumsum(sizes, 0) + n * torch.arange(1, kv + 1)  # each head's segment end in the result
    new_rows = (ends[:, None] - n + torch.arange(n)).flatten()
    old_rows = torch.arange(old.shape[0]) + n * torch.repeat_interleave(torch.arange(kv), sizes)
    result = old.new_empty((old.shape[0] + kv * n, *rest))
    result[old_rows] = old
    result[new_rows] = new.reshape(kv * n, *rest).to(old.dtype)
    return result


@dataclass
class HeldLayer:
    """One layer's cache after the prompt's decision: what it holds and its eviction state.

    budgets: [kv_heads] tokens per head the schedule brings each head back to, or None when the
    layer never evicts (a prefill-once schedule, or a prompt too short to compress).
    colsum: [N, group] attention each held full-precision token has received from every query so
    far, per query head of its group (kept for every-step and lagged schedules only).
    window_queries: [heads, w, d] float32, the most recent queries (the observation window).
    """

    layer: int
    n_layers: int
    policy: Policy
    budgets: torch.Tensor | None
    scaling: float
    full: Segments
    low: Segments | None
    colsum: torch.Tensor | None
    window_queries: torch.Tensor
    seen: int
    rope: Rotary | None = None  # the model's RoPE, for scorers that rotate queries
    rows_since_decision: int = field(default=0)
    layers: int = 1  # model layers stacked along the head axis (`stack`), layer after layer

    @classmethod
    def after_prefill(
        cls, policy: Policy, view: CacheView, keep: torch.Tensor, budgets: torch.Tensor | None, window: int, dtype: torch.dtype
    ) -> HeldLayer:
        """The layer once `keep` [kv, n] of the prefill view's tokens are kept at full precision out of
        `budgets` [kv] (the rest go to the retention, `handed_to_retention`)."""
        layer = cls(
            layer=view.layer,
            n_layers=view.n_layers,
            policy=policy,
            budgets=policy.retention.full_budgets(budgets) if policy.schedule.interval is not None and budgets is not None else None,
            scaling=view.scaling,
            full=Segments.from_mask(view.keys[:, :0], view.values[:, :0], view.positions[:0], keep[:, :0]),
            low=None,
            colsum=None,
            window_queries=view.queries[:, view.queries.shape[1] - window :].float(),
            seen=int(view.positions[-1]) + 1,
            rope=view.rope,
        )
        layer.shrink(view, keep, handed_to_retention(policy, view, keep, budgets), dtype)
        return layer

    @classmethod
    def stack(cls, layers: list[HeldLayer]) -> HeldLayer:
        """Consecutive layers of one sample as one layer whose KV heads are all theirs, layer after
        layer: each step then costs one set of tensor operations for all of them instead of one per
        layer. It decides what the layers would decide one by one when the policy's decisions are
        per head (`stacks_layers`); the simulator checks that before stacking."""
        first = layers[0]
        lows = None if all(layer.low is None for layer in layers) else [layer.low_segments() for layer in layers]
        return cls(
            layer=first.layer,
            n_layers=first.n_layers,
            policy=first.policy,
            budgets=torch.cat([layer.budgets for layer in layers]),
            scaling=first.scaling,
            full=Segments(
                torch.cat([layer.full.keys for layer in layers]),
                torch.cat([layer.full.values for layer in layers]),
                torch.cat([layer.full.positions for layer in layers]),
                [count for layer in layers for count in layer.full.counts],
            ),
            low=None if lows is None else Segments(
                PackedTokens.cat([low.keys for low in lows]),
                PackedTokens.cat([low.values for low in lows]),
                torch.cat([low.positions for low in lows]),
                [count for low in lows for count in low.counts],
            ),
            colsum=torch.cat([layer.colsum for layer in layers]),
            window_queries=torch.cat([layer.window_queries for layer in layers]),
            seen=first.seen,
            rope=first.rope,
            layers=sum(layer.layers for layer in layers),
        )

    # --- reading --------------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return len(self.full.counts)

    @property
    def stepwise(self) -> bool:
        return self.budgets is not None

    def readable_rows(self, unpack: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """What attention reads, as flat rows: (head [M], slot [M], keys [M, d], values [M, d], positions
        [M]). Each head reads its full-precision tokens at slots 0.. in position order, then its
        low-precision ones after them; keys and values are None without `unpack` (positions only)."""
        head, slot = self.full.rows
        keys, values, positions = self.full.keys, self.full.values, self.full.positions
        if self.low is None:
            return head, slot, keys, values, positions
        low_head, low_slot = self.low.rows
        head, slot = torch.cat([head, low_head]), torch.cat([slot, low_slot + torch.tensor(self.full.counts)[low_head]])
        positions = torch.cat([positions, self.low.positions])
        if not unpack:
            return head, slot, None, None, positions
        keys = torch.cat([keys, self.low.keys.unpack().to(keys.dtype)])
        values = torch.cat([values, self.low.values.unpack().to(values.dtype)])
        return head, slot, keys, values, positions

    def low_segments(self) -> Segments:
        """The low-precision tokens, as an empty set at the retention's bit widths when there are none."""
        if self.low is not None:
            return self.low
        bits = self.policy.retention.bits(self.layer, self.n_layers)
        empty = self.full.keys[:0]
        counts = [0] * self.kv_heads
        keys = PackedTokens.pack_channels(empty, bits.keys, bits.key_group, counts) if bits.key_group else PackedTokens.pack(empty, bits.keys)
        return Segments(keys, PackedTokens.pack(empty, bits.values), self.full.positions[:0], counts)

    def kept_positions(self) -> list[torch.Tensor]:
        """Per KV head, the positions held at full precision (in order)."""
        return list(self.full.per_head(self.full.positions))

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision, low-precision) tokens over all KV heads."""
        return self.full.tokens, 0 if self.low is None else self.low.tokens

    def low_counts(self) -> torch.Tensor:
        """[kv] low-precision tokens per head."""
        return torch.tensor(self.low.counts if self.low is not None else [0] * self.kv_heads)

    def held_bytes(self) -> int:
        """Bytes of keys and values this layer really holds, counted at the serving dtype."""
        full = (self.full.keys.numel() + self.full.values.numel()) * KV_ELEMENT_BYTES
        if self.low is None:
            return full
        return full + sum(packed.serving_nbytes(KV_ELEMENT_BYTES) for packed in (self.low.keys, self.low.values))

    # --- decoding -------------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the newest n tokens' keys and values [kv, n, d] to every head, at their true positions."""
        n = keys.shape[1]
        positions = torch.arange(self.seen, self.seen + n, device=keys.device).expand(self.kv_heads, n)
        counts = self.full.counts
        self.full = Segments(
            interleave(self.full.keys, counts, keys.to(self.full.keys.dtype)),
            interleave(self.full.values, counts, values.to(self.full.values.dtype)),
            interleave(self.full.positions, counts, positions),
            [count + n for count in counts],
        )
        if self.colsum is not None:
            self.colsum = interleave(self.colsum, counts, self.colsum.new_zeros(self.kv_heads, n, self.colsum.shape[1]))
        self.seen += n

    def attend(self, queries: torch.Tensor) -> torch.Tensor:
        """[heads, n, d] attention output of the newest n tokens' queries (already appended) over what
        the layer holds; every-step and lagged schedules then observe it and evict on their steps."""
        heads, n, head_dim = queries.shape
        query_positions = torch.arange(self.seen - n, self.seen, device=queries.device)
        grouped = queries.reshape(self.kv_heads, heads // self.kv_heads, n, head_dim)
        keys, values, positions = self._padded()
        output, probs = attend_heads(grouped, keys, values, positions, query_positions, self.scaling, self.stepwise)
        if probs is not None:
            self.observe(queries, probs)
        return output.reshape(heads, n, head_dim)

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What attention reads (`readable_rows`) as [kv, c, d] keys and values and [kv, c] positions,
        each head padded at the end to the longest head with positions no query sees. Equal counts and
        no low precision need no copy at all."""
        if self.low is None and self.full.uniform:
            shape = (self.kv_heads, self.full.counts[0])
            return self.full.keys.view(*shape, -1), self.full.values.view(*shape, -1), self.full.positions.view(shape)
        head, slot, keys, values, positions = self.readable_rows()
        never_seen = torch.iinfo(torch.int64).max
        return (
            scatter_rows(keys, head, slot, self.kv_heads),
            scatter_rows(values, head, slot, self.kv_heads),
            scatter_rows(positions, head, slot, self.kv_heads, never_seen),
        )

    def observe(self, queries: torch.Tensor, probs: torch.Tensor) -> None:
        """Accumulate the new rows' attention (probs [kv, group, n, c], `_padded`'s layout), slide the
        query window, and evict on the schedule's steps."""
        received = probs.sum(2)  # [kv, group, c]
        if self.low is None and self.full.uniform:  # `_padded` passed the rows as they are
            held = received.permute(0, 2, 1).reshape(self.full.tokens, -1)
        else:
            head, slot = self.full.rows  # full-precision tokens lead every head's row of `_padded`
            held = received[head, :, slot]
        self.colsum = self.colsum + held
        window = self.window_queries.shape[1]
        self.window_queries = torch.cat([self.window_queries, queries.float()], dim=1)[:, -window:]
        before = self.rows_since_decision
        self.rows_since_decision += queries.shape[1]
        interval = self.policy.schedule.interval
        if self.rows_since_decision // interval > before // interval:
            self.evict()

    def evict(self) -> None:
        """Bring every head back to its budget, by the policy's own scorer and selection rule."""
        view = self.view()
        kept = select(self.policy, view, self.policy.scorer.score(view), self.budgets)
        self.shrink(view, kept, handed_to_retention(self.policy, view, kept, self.budgets), self.full.keys.dtype)

    def view(self) -> CacheView:
        """What the policy sees at a decode step: every position some head holds at full precision
        (the union, in order; `present` says which head holds which), the query window, and the
        accumulated attention. The one rescoring view: scorers that pool along positions pool over
        the held tokens, in both the simulator and the live cache."""
        kv_heads, group = self.kv_heads, self.colsum.shape[1]
        head, slot = self.full.rows
        position = self.full.positions
        in_union = torch.zeros(self.seen, dtype=torch.bool)
        in_union[position] = True
        union = in_union.nonzero().flatten()
        at = (torch.cumsum(in_union, 0) - 1)[position]
        present = torch.zeros(kv_heads, union.numel(), dtype=torch.bool)
        present[head, at] = True
        colsum = torch.zeros(kv_heads, union.numel(), group)
        colsum[head, at] = self.colsum
        window = self.window_queries.shape[1]

        def scattered(flat: torch.Tensor) -> Callable[[], torch.Tensor]:
            def build() -> torch.Tensor:
                tensor = torch.zeros(kv_heads, union.numel(), flat.shape[-1])
                tensor[head, at] = flat.float()
                return tensor

            return build

        return HeldView(
            layer=self.layer,
            n_layers=self.n_layers,
            keys=scattered(self.full.keys),
            values=scattered(self.full.values),
            positions=union,
            queries=self.window_queries,
            query_positions=torch.arange(self.seen - window, self.seen),
            scaling=self.scaling,
            colsum=colsum.permute(0, 2, 1).reshape(kv_heads * group, -1),
            present=present,
            decoding=True,
            rope=self.rope,
            layers=self.layers,
            held=self.full,
            rows=(head, slot, at),
        )

    def shrink(self, view: CacheView, kept: torch.Tensor, evicted: torch.Tensor, dtype: torch.dtype) -> None:
        """Hold `kept` [kv, n] of `view`'s tokens at full precision and hand `evicted` to the retention."""
        retention = self.policy.retention
        # Nothing handed over and kept tokens left as they are: every retention then just drops.
        if retention.changes_tokens and (retention.rewrites_kept or bool(evicted.any())):
            retained = retention.retain(view.keys.float(), view.values.float(), kept, evicted, view.layer, view.n_layers)
            keys, values, low = retained.keys[kept], retained.values[kept], retained.low_precision
        else:
            (keys, values), low = view.take(kept), None
        self.full = Segments(keys.to(dtype), values.to(dtype), view.positions.expand_as(kept)[kept], kept.sum(1).tolist())
        if self.stepwise:
            group = view.heads // view.kv_heads
            colsum = view.colsum.reshape(view.kv_heads, group, -1).permute(0, 2, 1)
            self.colsum = colsum[kept].float()
            self.window_queries = view.queries[:, view.queries.shape[1] - self.window_queries.shape[1] :].float()
        if low is not None and bool(low.any()):
            self._keep_low_precision(view, low, retention.bits(view.layer, view.n_layers), dtype)

    def _keep_low_precision(self, view: CacheView, low: torch.Tensor, bits: LowBits, dtype: torch.dtype) -> None:
        positions = view.positions.expand_as(low)[low]
        counts = low.sum(1).tolist()
        flat_keys = view.keys.float()[low].to(dtype)
        keys = PackedTokens.pack_channels(flat_keys, bits.keys, bits.key_group, counts) if bits.key_group else PackedTokens.pack(flat_keys, bits.keys)
        values = PackedTokens.pack(view.values.float()[low].to(dtype), bits.values)
        if self.low is None:
            self.low = Segments(keys, values, positions, counts)
            return
        old = self.low
        self.low = Segments(
            PackedTokens.interleave(old.keys, old.counts, keys, counts),
            PackedTokens.interleave(old.values, old.counts, values, counts),
            torch.cat([p for pair in zip(old.per_head(old.positions), torch.split(positions, counts)) for p in pair]),
            [a + b for a, b in zip(old.counts, counts)],
        )


class _Scattered:
    """A decode view's keys or values: given as a function that scatters the held rows into the
    union layout, called the first time a part reads them (scorers of accumulated attention or
    positions never do, and dropping reads kept rows straight from the held ones)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, view: CacheView | None, owner: type | None = None):
        if view is None:
            return self
        value = view.__dict__[self.slot]
        if callable(value):
            value = view.__dict__[self.slot] = value()
        return value

    def __set__(self, view: CacheView, value) -> None:
        view.__dict__[self.slot] = value


class HeldView(CacheView):
    """`HeldLayer.view`: a CacheView over the held rows that works on them where it can. Keys and
    values are scattered into the union layout only when a part reads them; kept rows are taken
    straight from the held ones; and window attention is computed over each head's own rows, then
    placed in the union layout (zero where a head holds nothing, as masking gives), so its cost
    follows what the heads hold, not the union of it."""

    keys = _Scattered()
    values = _Scattered()

    def __init__(self, *, held: Segments, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], **fields) -> None:
        super().__init__(**fields)
        self.held = held  # the layer's full-precision rows, head after head
        self.rows = rows  # each held row's (head, slot in its head, index in the union)

    @property
    def kv_heads(self) -> int:
        return self.present.shape[0]

    def take(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Held rows are head after head in position order, as `mask`'s True entries are read.
        rows = mask[self.present].nonzero().flatten()
        return self.held.keys.index_select(0, rows), self.held.values.index_select(0, rows)

    def _attention_of_last(self, size: int) -> torch.Tensor:
        head, slot, at = self.rows
        kv_heads, group = self.kv_heads, self.heads // self.kv_heads
        keys = scatter_rows(self.held.keys, head, slot, kv_heads)
        positions = scatter_rows(self.held.positions, head, slot, kv_heads, torch.iinfo(torch.int64).max)
        logits = grouped_logits(self.queries[:, -size:].reshape(kv_heads, group, size, -1), keys, self.scaling)
        attention = causal_attention(logits, positions, self.query_positions[-size:])
        union = torch.zeros(kv_heads, group, size, self.length)
        union[head, :, :, at] = attention[head, :, :, slot]
        return union.reshape(self.heads, size, self.length)


def attend_heads(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    with_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of queries [kv, group, n, d] over keys, values [kv, c, d] at positions [kv, c]:
    (output [kv, group, n, d], probs [kv, group, n, c] float32 when asked for, else None).

    Causal by absolute position, so tokens fed together see only the earlier ones. With probs the
    arithmetic is float32 (the probabilities feed eviction decisions); without, it is SDPA.
    """
    kv_heads, group, n, head_dim = queries.shape
    if not with_probs:
        visible = positions[:, None, :] <= query_positions[None, :, None]  # [kv, n, c]
        mask = None if bool(visible.all()) else visible.repeat_interleave(group, dim=0)[None]
        output = F.scaled_dot_product_attention(
            queries.reshape(1, kv_heads * group, n, head_dim), keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=True
        )
        return output.reshape(kv_heads, group, n, head_dim), None
    probs = causal_attention(grouped_logits(queries, keys, scaling), positions, query_positions)
    output = torch.matmul(probs.reshape(kv_heads, group * n, -1), values.float()).reshape(kv_heads, group, n, head_dim)
    return output.to(queries.dtype), probs
