"""Token scorers; importing this package registers them."""

from kvsim.policies.scorers import window_attention  # noqa: F401
