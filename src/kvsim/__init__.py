"""kvsim: tune KV-cache eviction policies on captured attention traces, then prove them live."""

__version__ = "0.1.0"
