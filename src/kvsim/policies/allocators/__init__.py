"""Budget allocators; importing this package registers them."""

from kvsim.policies.allocators import (  # noqa: F401
    all_tokens,
    cake_preference,
    free_vector,
    global_top,
    head_adaptive,
    knots,
    prefix_mass,
    pyramid,
    retrieval_heads,
    uniform,
    variance_softmax,
)
