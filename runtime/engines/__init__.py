"""Engines: the frozen ViT run with a per-row task prefix (PyTorch, ONNX Runtime) and their attention."""
