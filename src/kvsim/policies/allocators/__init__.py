"""Budget allocators; importing this package registers them."""

from kvsim.policies.allocators import uniform  # noqa: F401
