"""The paper's own forward and checkpoint layout: the reference every fast path is proven against."""
