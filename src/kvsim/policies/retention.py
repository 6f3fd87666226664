"""What happens to an evicted token: dropped, merged into a kept one, or kept in low precision.

Every retention gets the same inputs (the cache's keys and values, the tokens kept, the tokens
evicted now) and returns the same thing: keys and values at full length, some rewritten, and which
evicted tokens stay readable in low precision. So the simulator and the live cache measure and
store any of them the same way.

Most retentions act on top of the budget (every evicted token is dropped, merged or quantized).
`mixed_precision` instead spends the budget's bytes: `full_budgets` says how many tokens of each
head's budget stay at full precision and `low_budgets` how many low-precision ones the rest of the
bytes buy; `kvsim.policies.held.handed_to_retention` picks which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from kvsim.policies.parts import Part, check, register

# Depth groups a search gives their own key and value bit widths (`MixedPrecision.suggest`).
DEPTH_GROUPS = 2
# Key groupings a search tries: per token, or per channel over KIVI's 32 tokens (its group size G).
KEY_GROUPS = [0, 32]


class LowBits(NamedTuple):
    """Bit widths of a layer's low-precision keys and values, and how keys are grouped.

    key_group 0: each key has its own scale and zero point over its channels (per token, like
    values). key_group G > 0: KIVI's per-channel keys (Liu et al., 2024, arXiv 2402.02750): each
    channel of G consecutive low-precision keys of a head (in position order) shares a scale and a
    zero point, since a few key channels carry outliers that a per-token range would spread over
    every other channel.
    """

    keys: int
    values: int
    key_group: int = 0


class Retained(NamedTuple):
    keys: torch.Tensor  # [kv_heads, n, d]
    values: torch.Tensor  # [kv_heads, n, d]
    low_precision: torch.Tensor  # [kv_heads, n] bool: evicted, but still readable at reduced precision


@dataclass(frozen=True)
class Retention(Part):
    kind: ClassVar[str] = "retention"

    def retain(
        self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor, layer: int = 0, n_layers: int = 1
    ) -> Retained:
        """keys, values: [kv_heads, n, d]; keep, evicted: [kv_heads, n] bool, disjoint; the layer's
        place in the model, for retentions whose precision depends on depth."""
        raise NotImplementedError

    def bits(self, layer: int = 0, n_layers: int = 1) -> LowBits | None:
        """Bit widths of layer `layer`'s low-precision tokens (of `n_layers`); None when there are none."""
        return None

    def full_budgets(self, budgets: torch.Tensor) -> torch.Tensor:
        """Tokens of each head's budget held at full precision: all of them, unless the retention
        spends part of the budget's bytes on low precision."""
        return budgets

    def low_budgets(self, budgets: torch.Tensor, full: torch.Tensor, full_bytes: int, buy: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Low-precision tokens per head that the bytes of `budgets` left after `full` full-precision
        tokens buy (a token costs `full_bytes` at full precision; `buy` turns spare bytes per head
        into low-precision tokens, scales included); None when the retention takes every evicted
        token, on top of the budget."""
        return None

    @property
    def drops_while_decoding(self) -> bool:
        """Whether tokens evicted at decode steps are simply dropped (what they became at the prompt's
        decision is kept as it is): then a decode step changes no held token."""
        return False

    @property
    def changes_tokens(self) -> bool:
        """Whether `retain` changes anything: dropping does not, so a cache can keep its kept rows as they are."""
        return True

    @property
    def rewrites_kept(self) -> bool:
        """Whether kept (full-precision) tokens' keys change, so attention over them must be recomputed."""
        return False


@register
@dataclass(frozen=True)
class Drop(Retention):
    name = "drop"
    changes_tokens = False
    drops_while_decoding = True

    def retain(self, keys, values, keep, evicted, layer=0, n_layers=1):
        return Retained(keys, values, torch.zeros_like(keep))


@register
@dataclass(frozen=True)
class Merge(Retention):
    """Fold each evicted token into its most similar kept token (D2O, Wan et al., ICLR 2025).

    Per KV head, an evicted token whose key's cosine similarity to its nearest kept key is at
    least `threshold` is merged: target ← (target + Σ sim·evicted) / (1 + count), for keys and
    values alike (D2O's `scatter_reduce(mean, include_self=True)` of similarity-weighted tokens).
    D2O sets the threshold by an EMA of mean similarities; here it is a parameter search can tune.
    """

    name = "merge"
    threshold: float = 0.5
    rewrites_kept = True

    def validate(self) -> None:
        check(-1.0 <= self.threshold <= 1.0, self, f"threshold must be in [-1, 1], got {self.threshold}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Merge:
        return cls(threshold=trial.suggest_float(f"{prefix}threshold", 0.0, 0.95))

    def retain(self, keys, values, keep, evicted, layer=0, n_layers=1):
        # Only tokens evicted now are compared (one per head per step in every-step replays), and
        # only with kept ones, so the cost is O(evicted · kept) rather than O(n²).
        rows = evicted.any(dim=0).nonzero().flatten()
        if rows.numel() == 0 or not bool(keep.any()):
            return Retained(keys, values, torch.zeros_like(keep))
        unit = torch.nn.functional.normalize(keys, dim=-1)
        # Each head's kept tokens first, in position order, padded to the head keeping most.
        kept_first = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, : int(keep.sum(1).max())]
        candidates = unit.gather(1, kept_first[..., None].expand(-1, -1, unit.shape[-1]))
        similarity = unit[:, rows] @ candidates.transpose(-1, -2)  # [kv, evicted, kept]
        similarity = similarity.masked_fill(~keep.gather(1, kept_first)[:, None, :], float("-inf"))
        best, nearest = similarity.max(dim=-1)  # each evicted token's nearest kept token (the earliest on ties)
        target = kept_first.gather(1, nearest)
        merged = evicted[:, rows] & (best >= self.threshold)
        weight = torch.where(merged, best, torch.zeros_like(best))[..., None]
        def fold(tensor: torch.Tensor) -> torch.Tensor:
            index = target[..., None].expand(-1, -1, tensor.shape[-1])
            return tensor.clone().scatter_add_(1, index, weight * tensor[:, rows])

        new_keys, new_values = fold(keys), fold(values)
        counts = torch.ones(keys.shape[:2]).scatter_add_(1, target, merged.to(keys.dtype))[..., None]
        new_keys = torch.where(keep[..., None], new_keys / counts, keys)
        new_values = torch.where(keep[..., None], new_values / counts, values)
        return Retained(new_keys, new_values, torch.zeros_like(keep))


@register
@dataclass(frozen=True)
class Quantize(Retention):
    """Keep evicted tokens in `bits`-bit precision instead of dropping them (MiKV, Yang et al., 2024).

    Per token and head, asymmetric round-to-nearest: scale = (max − min) / (2^bits − 1), zero = min,
    over the head dimension. MiKV's per-channel key/query balancer is not applied (a known gap).
    """

    name = "quantize"
    nbits: int = 2

    def validate(self) -> None:
        check(1 <= self.nbits <= 8, self, f"nbits must be in [1, 8], got {self.nbits}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Quantize:
        return cls(nbits=trial.suggest_int(f"{prefix}nbits", 2, 4))

    def bits(self, layer: int = 0, n_layers: int = 1) -> LowBits | None:
        return LowBits(self.nbits, self.nbits)

    def retain(self, keys, values, keep, evicted, layer=0, n_layers=1):
        low, bits = evicted[..., None], self.bits(layer, n_layers)
        if bits.key_group:
            quantized_keys = keys.clone()
            for head in range(keys.shape[0]):
                quantized_keys[head, evicted[head]] = fake_quantize_channels(keys[head, evicted[head]], bits.keys, bits.key_group)
        else:
            quantized_keys = fake_quantize(keys, bits.keys)
        keys = torch.where(low, quantized_keys, keys)
        values = torch.where(low, fake_quantize(values, bits.values), values)
        return Retained(keys, values, evicted)


def quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) along `dim`: asymmetric round to nearest, codes in [0, 2^bits).

    codes are uint8 (one per element); scale and zero keep x's shape with `dim` of size 1.
    The live cache stores these (packed); the simulator rebuilds values from them, so both read the
    same low-precision numbers.
    """
    zero, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - zero) / (2**bits - 1)).clamp(min=1e-8)
    codes = ((x - zero) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


def quantize_channels(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head's [m, d] keys per channel over groups of `group` consecutive tokens (KIVI):
    (codes [m, d], scale [g, d], zero [g, d]) with g = ceil(m / group) groups, the last one short."""
    m, d = x.shape
    groups = -(-m // group)
    # Pad the last group with copies of its own last row: the group's minimum and maximum stay its own.
    padded = torch.cat([x, x[-1:].expand(groups * group - m, d)]) if m else x.reshape(0, group, d)
    codes, scale, zero = quantize(padded.reshape(groups, group, d), bits, dim=1)
    return codes.reshape(-1, d)[:m], scale.reshape(groups, d), zero.reshape(groups, d)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale + zero


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """[m, d] keys from `quantize_channels`' codes: token i reads its group's (i // group) scale and zero."""
    return dequantize(codes, scale.repeat_interleave(group, 0)[: codes.shape[0]], zero.repeat_interleave(group, 0)[: codes.shape[0]])


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize along the last dimension to `bits` bits and back."""
    return dequantize(*quantize(x, bits))


def fake_quantize_channels(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize one head's [m, d] keys per channel in groups of `group` tokens, and back."""
    return dequantize_channels(*quantize_channels(x, bits, group), group)


@register
@dataclass(frozen=True)
class MixedPrecision(Quantize):
    """Quantize inside the budget: the budget's bytes buy full- and low-precision tokens (MiKV's
    mixed precision, Yang et al., 2024, arXiv 2402.18096, measured at the memory dropping holds).

    A head's budget B (tokens at full precision) is B full-precision tokens' bytes. The top-ranked
    F = round(full_share · B) tokens stay at full precision (the selection rule: sinks, recent
    window, scores), the next-best are kept at low precision, as many as the remaining (B − F) full
    tokens' bytes buy at `kvsim.policies.held.token_bytes` (codes plus a scale and zero point per
    token), and the rest are dropped. So the layer holds at most what dropping at B holds. The low
    set is chosen once, at the prompt's decision; tokens evicted while decoding are dropped.

    Bit widths: `nbits` for keys and values in every layer, or, per depth group, `key_bits` and
    `value_bits` (k entries split the layers into k equal groups, shallow first). Keys and values
    apart because keys carry the outlier channels and suffer more from few bits (KIVI, Liu et
    al., 2024, arXiv 2402.02750); per layer because layers differ in how much precision they need
    (KVTuner, Li et al., 2025, arXiv 2502.04420, which searches such per-layer key/value pairs). Every
    low-precision token here is quantized per token (KIVI's per-channel key groups are not built).

    Parameters: nbits (2), full_share (0.5, in [0, 1]; 1 is dropping, 0 all low precision),
    key_bits, value_bits (empty: `nbits`; both given or neither, each width in [1, 8]), key_group
    (0: keys per token; G ≥ 2: KIVI's per-channel keys over groups of G tokens, see `LowBits`).
    """

    name = "mixed_precision"
    drops_while_decoding = True  # the low set is chosen at the prompt's decision only
    full_share: float = 0.5
    key_bits: tuple[int, ...] = ()
    value_bits: tuple[int, ...] = ()
    key_group: int = 0

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.full_share <= 1.0, self, f"full_share must be in [0, 1], got {self.full_share}")
        check(self.key_group == 0 or self.key_group >= 2, self, f"key_group must be 0 (keys per token) or at least 2 tokens, got {self.key_group}")
        check(bool(self.key_bits) == bool(self.value_bits), self, "key_bits and value_bits go together: give both, or neither to use nbits")
        for name in ("key_bits", "value_bits"):
            widths = getattr(self, name)
            check(all(1 <= bits <= 8 for bits in widths), self, f"{name} must be bit widths in [1, 8], got {list(widths)}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> MixedPrecision:
        full_share = trial.suggest_float(f"{prefix}full_share", 0.1, 0.9)
        key_group = trial.suggest_categorical(f"{prefix}key_group", KEY_GROUPS)
        if not trial.suggest_categorical(f"{prefix}per_layer", [False, True]):
            return cls(nbits=trial.suggest_int(f"{prefix}nbits", 2, 4), full_share=full_share, key_group=key_group)
        return cls(
            full_share=full_share,
            key_bits=tuple(trial.suggest_categorical(f"{prefix}key_bits{g}", [2, 3, 4, 8]) for g in range(DEPTH_GROUPS)),
            value_bits=tuple(trial.suggest_categorical(f"{prefix}value_bits{g}", [2, 3, 4]) for g in range(DEPTH_GROUPS)),
            key_group=key_group,
        )

    def trial_params(self, prefix: str) -> dict:
        params = {f"{prefix}full_share": self.full_share, f"{prefix}key_group": self.key_group, f"{prefix}per_layer": bool(self.key_bits)}
        if not self.key_bits:
            return params | {f"{prefix}nbits": self.nbits}
        widths = {f"{prefix}key_bits{g}": bits for g, bits in enumerate(self.key_bits)}
        return params | widths | {f"{prefix}value_bits{g}": bits for g, bits in enumerate(self.value_bits)}

    def bits(self, layer: int = 0, n_layers: int = 1) -> LowBits | None:
        if not self.key_bits:
            return LowBits(self.nbits, self.nbits, self.key_group)
        key_bits, value_bits = self.key_bits[layer * len(self.key_bits) // n_layers], self.value_bits[layer * len(self.value_bits) // n_layers]
        return LowBits(key_bits, value_bits, self.key_group)

    def full_budgets(self, budgets: torch.Tensor) -> torch.Tensor:
        return (budgets.double() * self.full_share).round().to(budgets.dtype)

    def low_budgets(self, budgets, full, full_bytes, buy):
        return buy((budgets - full).clamp(min=0) * full_bytes)
