"""Serving: the KServe v2 API, the mixed-task batcher, the task store, metrics and preprocessing."""
