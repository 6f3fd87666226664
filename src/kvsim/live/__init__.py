"""The live engine: kvsim policies applied inside a transformers model while it generates."""

from kvsim.live.cache import PolicyCache

__all__ = ["PolicyCache"]
