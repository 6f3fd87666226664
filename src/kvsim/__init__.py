"""kvsim: tune KV-cache eviction policies on captured attention traces, then prove them live."""

__version__ = "0.1.0"


def load_policy(path):
    """Read a policy exported by `kvsim export`; see `kvsim.live.apply.TunedPolicy`.

    Imported on first use so `import kvsim` stays light (no torch or transformers).
    """
    from kvsim.live.apply import load_policy as load

    return load(path)
