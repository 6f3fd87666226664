"""Token scorers; importing this package registers them."""

from kvsim.policies.scorers import (  # noqa: F401
    accumulated_attention,
    cake_indicator,
    expected_attention,
    global_local,
    key_diff,
    key_norm,
    kvzip,
    lag_kv,
    last_query,
    mixture,
    random_scores,
    recency,
    recurrence,
    window_attention,
)
