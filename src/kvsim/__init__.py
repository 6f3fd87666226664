"""kvsim: tune KV-cache eviction policies on captured attention traces, then prove them live."""

__version__ = "0.1.0"


def load_policy(path):
    """Read a policy exported by `kvsim export`; see `kvsim.live.apply.TunedPolicy`.

    Imported on first use so `import kvsim` stays light (no torch or transformers).
    """
    from kvsim.live.apply import load_policy as load

    return load(path)


def capture(out, **options):
    """Capture attention traces into a TraceSet folder and return it: `kvsim capture` as a call.
    See `kvsim.traces.capture_run.capture` for the options (the CLI's, by the same names)."""
    from kvsim.traces.capture_run import capture as run

    return run(out, **options)
