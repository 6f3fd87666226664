"""Named presets reproducing published methods with their reference defaults.

Budgets are not part of a preset: every preset is evaluated at the budgets asked for, under the one
budget rule (kvsim.policies.budget): sinks and recent windows count inside the budget. `full` is the
one exception: it keeps every token whatever the budget, as the reference point. Defaults and
sources: ../shared/reference/policies.md (section numbers below).
"""

from __future__ import annotations

from kvsim.errors import KvsimError
from kvsim.policies.allocators.all_tokens import AllTokens
from kvsim.policies.allocators.cake_preference import CakePreference
from kvsim.policies.allocators.global_top import GlobalTop
from kvsim.policies.allocators.head_adaptive import HeadAdaptive
from kvsim.policies.allocators.prefix_mass import PrefixMass
from kvsim.policies.allocators.pyramid import Pyramid
from kvsim.policies.allocators.retrieval_heads import RetrievalHeads
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.allocators.variance_softmax import VarianceSoftmax
from kvsim.policies.policy import Policy, load_policy_spec
from kvsim.policies.retention import Merge, Quantize
from kvsim.policies.schedules import EveryStep, Lagged, PrefillOnce
from kvsim.policies.scorers.accumulated_attention import AccumulatedAttention
from kvsim.policies.scorers.cake_indicator import CakeIndicator
from kvsim.policies.scorers.expected_attention import ExpectedAttention
from kvsim.policies.scorers.global_local import GlobalLocal
from kvsim.policies.scorers.key_diff import KeyDiff
from kvsim.policies.scorers.key_norm import KeyNorm
from kvsim.policies.scorers.kvzip import KVzip
from kvsim.policies.scorers.lag_kv import LagKV
from kvsim.policies.scorers.last_query import LastQuery
from kvsim.policies.scorers.random_scores import RandomScores
from kvsim.policies.scorers.recency import Recency
from kvsim.policies.scorers.recurrence import Recurrence
from kvsim.policies.scorers.window_attention import WindowAttention

# The observation / recent window of the SnapKV family's reference LongBench configs (§1-3, §8).
WINDOW = 32
# The label of the simulator's hindsight-optimal selection in results; no policy may take it.
ORACLE = "oracle"

PRESETS: dict[str, Policy] = {
    policy.name: policy
    for policy in [
        # The full cache: every token kept, budget ignored (the reference every policy is measured against).
        Policy("full", Recency(), AllTokens()),
        # Random scores, uniform budgets (kvpress RandomPress): the floor an informed policy must beat.
        Policy("random", RandomScores(seed=0), Uniform()),
        # StreamingLLM (§5): 4 sink tokens + the most recent tokens, trimmed every step. Positions are
        # not re-indexed inside the cache (the reference's pos-shift patch).
        Policy("streaming_llm", Recency(), Uniform(), EveryStep(sinks=4)),
        # H2O (§4): accumulated attention, evicted every step, with a protected recent window. The
        # paper splits the budget 50/50 (10 % heavy + 10 % recent); kvsim's window is a token count, so
        # it is the family's 32 tokens (KVCache-Factory's H2O port uses its window w likewise).
        Policy("h2o", AccumulatedAttention(gqa="mean"), Uniform(), EveryStep(recent=WINDOW)),
        # TOVA (§6): last query's attention averaged over the layer's heads, one shared set per layer,
        # every step, nothing protected.
        Policy("tova", LastQuery(), Uniform(), EveryStep()),
        # SnapKV reference LongBench configs (§2): window 32, max pooling, kernel 7; window always kept.
        Policy("snapkv", WindowAttention(window=WINDOW, pool="max", kernel=7), Uniform(), PrefillOnce(recent=WINDOW)),
        # PyramidKV (§3): SnapKV's score, arithmetic layer budgets with beta 20 over B − w, window kept.
        Policy(
            "pyramidkv",
            WindowAttention(window=WINDOW, pool="max", kernel=7),
            Pyramid(beta=20),
            PrefillOnce(recent=WINDOW),
        ),
        # Ada-KV (§8): window mean, GQA mean, max pooling 7, head-adaptive budgets with floor_alpha
        # 0.2 as in its GQA scripts, window kept. (Ada-KV reduces the group before pooling;
        # window_attention pools each query head first, as SnapKV/kvpress do.)
        Policy(
            "adakv",
            WindowAttention(window=WINDOW, pool="max", kernel=7, gqa="mean"),
            HeadAdaptive(alpha=0.2),
            PrefillOnce(recent=WINDOW),
        ),
        # CAKE (§1): mean + 200·var indicator with avg pooling 5, layer preference with tau 1.0 (the
        # reference's fallback when no per-model value is tuned), window 32 kept; non-cascading. As
        # published it keeps evicting while decoding: every step, each layer drops one token by the
        # newest query's pooled attention, holding its budget plus the window.
        Policy(
            "cake",
            CakeIndicator(window=WINDOW, gamma=200.0, kernel=5),
            CakePreference(window=WINDOW, tau1=1.0, tau2=1.0),
            EveryStep(recent=WINDOW),
        ),
        # CAKE's prefill decision alone: the cache then grows as in SnapKV (kvsim's `cake` before it
        # evicted while decoding; kept under its own name for comparison).
        Policy(
            "cake_prefill",
            CakeIndicator(window=WINDOW, gamma=200.0, kernel=5),
            CakePreference(window=WINDOW, tau1=1.0, tau2=1.0),
            PrefillOnce(recent=WINDOW),
        ),
        # PrefixKV (§9): head-averaged accumulated attention shared by the layer's heads, a shared
        # cumulative-mass threshold across layers; protects `--start-size 1` and the last token.
        Policy("prefixkv", AccumulatedAttention(gqa="layer"), PrefixMass(), PrefillOnce(sinks=1, recent=1)),
        # D2O (§10): accumulated attention, variance-softmax layer budgets, 4 sinks + a recent window,
        # every step, evicted tokens merged into similar kept ones (fixed threshold instead of the EMA).
        Policy(
            "d2o",
            AccumulatedAttention(gqa="mean"),
            VarianceSoftmax(),
            EveryStep(sinks=4, recent=WINDOW),
            Merge(threshold=0.5),
        ),
        # EMS (§11, paper-only): global + local score, head-adaptive counts, window kept, merge.
        Policy(
            "ems",
            GlobalLocal(local_weight=0.5, window=WINDOW),
            HeadAdaptive(alpha=0.2),
            PrefillOnce(recent=WINDOW),
            Merge(threshold=0.5),
        ),
        # RazorAttention (§12), adapted: 15 % retrieval heads (14 % induction + 1 % echo) keep all;
        # the others keep 4 sinks + the most recent tokens (the recency score, and a protected local
        # window of 32 that also marks what counts as far for the retrieval ranking), no compensation token.
        Policy(
            "razor",
            Recency(),
            RetrievalHeads(retrieval_ratio=0.15, window=WINDOW),
            PrefillOnce(sinks=4, recent=WINDOW),
        ),
        # LazyEviction (§13, unverified): peak recent attention, evicted every 16 steps with the last
        # 32 tokens kept (the paper's W = 175 was fitted to long MATH500 reasoning traces).
        Policy("lazy", Recurrence(window=WINDOW), Uniform(), Lagged(recent=WINDOW, every=16)),
        # MiKV (§14): H2O-style selection at prefill; evicted tokens kept in 2-bit precision.
        Policy("mikv", AccumulatedAttention(gqa="mean"), Uniform(), PrefillOnce(recent=WINDOW), Quantize(nbits=2)),
        # Knorm (kvpress KnormPress): keep the lowest-norm keys, nothing protected.
        Policy("knorm", KeyNorm(), Uniform()),
        # The query-agnostic methods leading kvpress's leaderboard, with kvpress 0.5's defaults; their
        # sink tokens are protected inside the scores, as kvpress does, so allocators count them alike.
        # KVzip: attention received while the model repeats the prefix (capture --kvzip), 4 sinks,
        # budgets competed for across all layers and heads (kvpress's layerwise=False).
        Policy("kvzip", KVzip(sinks=4), GlobalTop()),
        # Expected Attention: expected attention of the next 512 queries from the statistics of the
        # last 32 (kvpress uses all prompt queries after the sinks), 4 sinks, value-norm rescaled.
        Policy("expected_attention", ExpectedAttention(window=WINDOW, future=512, sinks=4), Uniform()),
        # kvpress's AdaKVPress(ExpectedAttentionPress()): the same scores, head-adaptive budgets,
        # alpha_safeguard 0.2 (Ada-KV's budget rule, see head_adaptive; kvpress's differs slightly).
        Policy("adakv_expected_attention", ExpectedAttention(window=WINDOW, future=512, sinks=4), HeadAdaptive(alpha=0.2)),
        # KeyDiff: keys least similar to the mean key, nothing protected (kvpress KeyDiffPress).
        Policy("keydiff", KeyDiff(), Uniform()),
        # LagKV: each 128-token partition scored against the next one's range, 4 sinks, the last
        # partition kept (kvpress LagKVPress defaults).
        Policy("lagkv", LagKV(sinks=4, lag=128), Uniform()),
        # ChunkKV over SnapKV's scores: whole 10-token chunks (the paper's chunk size), window kept.
        Policy("chunkkv", WindowAttention(window=WINDOW, pool="chunk", kernel=10), Uniform(), PrefillOnce(recent=WINDOW)),
    ]
}


def resolve_policy(name_or_path: str) -> Policy:
    """A preset name or a path to a JSON spec."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if name_or_path.endswith(".json"):
        return load_policy_spec(name_or_path)
    raise KvsimError(f"unknown policy {name_or_path!r}: choose a preset ({', '.join(PRESETS)}) or a .json spec")


def resolve_policies(names: list[str]) -> list[Policy]:
    """Resolve several `--policy` items, whose names must tell them apart in every result table.

    A name that two different policies claim (a spec named like a preset, like `oracle`, or like
    another spec of the call) is refused rather than merged: results are grouped by name, so either
    one would silently report the other's numbers. The same policy asked for twice is kept once.
    """
    chosen: dict[str, tuple[Policy, str]] = {}
    for item in names:
        policy = resolve_policy(item)
        if policy.name == ORACLE:
            raise KvsimError(f"{item} is named {ORACLE!r}, the label of the simulator's hindsight bound: rename the policy")
        preset = f"the preset {policy.name}"
        claimed = chosen.get(policy.name) or ((PRESETS[policy.name], preset) if policy.name in PRESETS else None)
        if claimed is not None and claimed[0] != policy:
            raise KvsimError(
                f"{item} is named {policy.name!r} like {claimed[1]} but is a different policy: "
                "give it its own \"name\" so results tell them apart"
            )
        chosen[policy.name] = (policy, preset if item in PRESETS else item)
    return [policy for policy, _ in chosen.values()]
