"""The scorer interface and the small tensor steps several scorers share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsim.policies.parts import Part, check
from kvsim.policies.view import CacheView

POOLS = ("avg", "max", "none", "chunk")
# ChunkKV chunk lengths the search tries (its reference default is 10; kvpress defaults to 20).
CHUNKS = (4, 10, 20, 32)
GQA_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class Scorer(Part):
    """Importance of every cached token, per KV head: higher means keep."""

    kind: ClassVar[str] = "scorer"

    def score(self, view: CacheView) -> torch.Tensor:
        """[kv_heads, n] float32 scores for the tokens of `view`."""
        raise NotImplementedError

    @property
    def per_head(self) -> bool:
        """Whether each KV head's scores depend only on that head's own held tokens, its queries and
        their positions (and, for scores shared by a layer's heads, on that layer's heads through
        `layer_mean`), never on which positions other heads hold: pooling along the union of held
        positions does not qualify, nor do per-layer random draws. Then the simulator may replay
        many layers as one stack of heads (`kvsim.policies.held.stacks_layers`)."""
        return False

    def requirements(self) -> frozenset[str]:
        """Optional statistics the traces must hold for this scorer (names of capture options)."""
        return frozenset()

    def trial_params(self, prefix: str) -> dict:
        params = super().trial_params(prefix)
        if getattr(self, "pool", None) == "chunk":  # `suggest_pool` names a chunk length apart from a kernel
            params[f"{prefix}chunk"] = params.pop(f"{prefix}kernel")
        return params


def unpooled(how: str, kernel: int) -> bool:
    """Whether `pool_scores` leaves scores as they are (so each token keeps its own score)."""
    return how == "none" or (how != "chunk" and kernel <= 1)


def pool_scores(scores: torch.Tensor, how: str, kernel: int) -> torch.Tensor:
    """Smooth scores along positions so a heavy hitter's neighbours are kept with it.

    Matches the reference codes: avg pooling counts the zero padding (`count_include_pad`), max
    pooling pads with -inf; both keep the length (odd kernel, stride 1). "chunk" is ChunkKV's
    selection unit (`chunk_scores`): `kernel` is the chunk length.
    """
    if how == "chunk":
        return chunk_scores(scores, kernel)
    if unpooled(how, kernel):
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    if how == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(scores.shape)


def chunk_scores(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """[rows, n] -> [rows, n]: every token gets its chunk's score, the same in every row (head).

    ChunkKV (Liu et al., 2025, arXiv 2502.00299; kvpress ChunkKVPress): the prefix is cut into
    chunks of `chunk` tokens (the last one may be shorter), a chunk's score is the mean of its
    tokens' scores summed over heads, and whole chunks are kept, the same ones in every head, so
    the kept text stays contiguous. Here the chunk score is given to each of its tokens; the
    selection then takes whole chunks in score order, and ties inside the chunk the budget cuts
    go to its earlier tokens (kvpress instead keeps ⌊chunks · (1 − ratio)⌋ whole chunks, so the
    two differ by less than one chunk per head).
    """
    n = scores.shape[-1]
    starts = torch.arange(0, n, chunk)
    sums = torch.zeros(starts.numel()).index_add_(0, torch.arange(n) // chunk, scores.float().sum(0))
    sizes = torch.diff(torch.cat([starts, torch.tensor([n])]))
    means = sums / sizes
    return means.repeat_interleave(sizes)[None, :].expand(scores.shape[0], -1).contiguous()


def check_pool(part: Part, pool: str, kernel: int) -> None:
    check(pool in POOLS, part, f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "chunk":
        check(kernel >= 1, part, f"kernel (the chunk length) must be >= 1, got {kernel}")
    else:
        check(kernel >= 1 and kernel % 2 == 1, part, f"kernel must be an odd number >= 1, got {kernel}")


def check_pooling(part: Part, pool: str, kernel: int, gqa: str) -> None:
    check_pool(part, pool, kernel)
    check(gqa in GQA_REDUCTIONS, part, f"gqa must be one of {', '.join(GQA_REDUCTIONS)}, got {gqa!r}")


def suggest_pool(trial, prefix: str) -> dict:
    """pool and kernel; a chunk length is a separate parameter, as its range differs from a kernel's."""
    pool = trial.suggest_categorical(f"{prefix}pool", list(POOLS))
    if pool == "chunk":
        return {"pool": pool, "kernel": trial.suggest_categorical(f"{prefix}chunk", list(CHUNKS))}
    return {"pool": pool, "kernel": trial.suggest_categorical(f"{prefix}kernel", [1, 3, 5, 7, 9])}


def suggest_pooling(trial, prefix: str) -> dict:
    return {**suggest_pool(trial, prefix), "gqa": trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS))}


def protect_sinks(scores: torch.Tensor, positions: torch.Tensor, sinks: int) -> torch.Tensor:
    """Scores with the first `sinks` positions raised above every other score.

    kvpress's ExpectedAttention, LagKV and KVzip keep their sink tokens this way, inside the score,
    so allocators that share budget across heads or layers count them where the press does (a
    schedule's `sinks` protects them only inside each head's budget).
    """
    if sinks == 0 or scores.numel() == 0:
        return scores
    top = scores[torch.isfinite(scores)].max() if torch.isfinite(scores).any() else scores.new_tensor(0.0)
    return scores.masked_fill((positions < sinks)[None, :], float(top) + 1.0)
