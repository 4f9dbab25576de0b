"""Serve many E2VPT-tuned tasks from one frozen ViT: tasks are data, the backbone is code."""

from runtime.backbone import RANDOM_WEIGHTS, Backbone, BackboneError, BackboneSpec, fingerprint
from runtime.compile import CompiledTask, compile_task
from runtime.engine import Engine
from runtime.package import PackageError, Preprocess, TaskPackage, load_package
from runtime.prompts import TaskPrompts
from runtime.registry import Snapshot, TaskEntry, TaskRegistry, UnknownTaskError

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
