"""Serve many E2VPT-tuned tasks from one frozen ViT: tasks are data, the backbone is code."""

from runtime.core.backbone import RANDOM_WEIGHTS, Backbone, BackboneError, BackboneSpec, fingerprint
from runtime.core.compile import CompiledTask, compile_task
from runtime.core.package import PackageError, Preprocess, TaskPackage, load_package
from runtime.core.prompts import TaskPrompts
from runtime.core.registry import Snapshot, TaskEntry, TaskRegistry, UnknownTaskError
from runtime.engines.torch_engine import Engine

__all__ = [
    "RANDOM_WEIGHTS",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "CompiledTask",
    "Engine",
    "PackageError",
    "Preprocess",
    "Snapshot",
    "TaskEntry",
    "TaskPackage",
    "TaskPrompts",
    "TaskRegistry",
    "UnknownTaskError",
    "compile_task",
    "fingerprint",
    "load_package",
]
