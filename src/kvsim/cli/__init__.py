"""The `kvsim` command: one module per stage, each a thin layer over its subpackage."""
