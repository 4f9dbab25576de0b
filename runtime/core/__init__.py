"""Tasks as data: the backbone, task packages, compile-at-load, the registry and the per-batch plan."""
