"""Token scorers; importing this package registers them."""

from kvsim.policies.scorers import (  # noqa: F401
    accumulated_attention,
    cake_indicator,
    global_local,
    key_norm,
    last_query,
    mixture,
    random_scores,
    recency,
    recurrence,
    window_attention,
)
