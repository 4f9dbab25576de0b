"""From training to serving: read E2VPT checkpoints, apply pruning, validate, write task packages."""

from exporter.backbone import extract_backbone, resolve_backbone, save_backbone
from exporter.checkpoint import ExportError, LoadedTask, read_checkpoint, write_native

__all__ = [
    "ExportError",
    "LoadedTask",
    "extract_backbone",
    "read_checkpoint",
    "resolve_backbone",
    "save_backbone",
    "write_native",
]
