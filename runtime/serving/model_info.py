"""What the server says about a loaded task, as plain data: metadata, configuration, statistics.

The gRPC servicer and an HTTP front end render these; the values are Triton's (datatypes,
``FORMAT_*`` layouts, ``KIND_*`` instance kinds) so a client written for Triton reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.core.registry import TaskEntry
from runtime.serving.metrics import TaskStats
from runtime.serving.protocol import (
    EXTENSIONS,
    INPUTS,
    OUTPUT_NAME,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    input_dims,
)


@dataclass(frozen=True)
class ServerMetadata:
    name: str = SERVER_NAME
    version: str = SERVER_VERSION
    extensions: tuple[str, ...] = EXTENSIONS


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class ConfigTensor:
    name: str
    datatype: str
    dims: tuple[int, ...]
    layout: str = "FORMAT_NONE"
    optional: bool = False
    label_filename: str = ""


@dataclass(frozen=True)
class QueueSettings:
    """The dynamic batcher's settings as Triton's config reports them (``dynamic_batching``)."""

    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    priority_levels: int
    default_priority_level: int


@dataclass(frozen=True)
class ModelConfiguration:
    name: str
    platform: str
    backend: str
    inputs: tuple[ConfigTensor, ...]
    outputs: tuple[ConfigTensor, ...]
    queue: QueueSettings
    instance_kind: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatistics:
    name: str
    version: str
    stats: TaskStats
    memory_kind: str
    memory_bytes: int


def metadata_of(entry: TaskEntry, declared_input: str) -> ModelMetadata:
    """The metadata declares one input (``declared_input``), as a client that sends every declared
    input (perf_analyzer) needs; the other forms are still accepted (docs/serving.md)."""
    size = entry.info.preprocess.input_size
    form = INPUTS[declared_input]
    return ModelMetadata(
        name=entry.task_id,
        versions=(str(entry.version),),
        platform=PLATFORM,
        inputs=(TensorMetadata(form.name, form.datatype, (-1, *input_dims(form.name, size))),),
        outputs=(TensorMetadata(OUTPUT_NAME, "FP32", (-1, entry.num_classes)),),
    )


def configuration_of(
    entry: TaskEntry, declared_input: str, queue: QueueSettings, device_type: str
) -> ModelConfiguration:
    info, pre = entry.info, entry.info.preprocess
    declared = INPUTS[declared_input]
    parameters = {
        "accepted_inputs": "exactly one of: image (BYTES [N] or [N, 1], JPEG/PNG), pixels (UINT8 "
        "[N, H, W, 3], any H and W), input (FP32 [N, 3, S, S], normalized)",
        "input_size": str(pre.input_size),
        "mean": ",".join(map(str, pre.mean)),
        "std": ",".join(map(str, pre.std)),
        "resize": pre.resize,
        "crop_pct": str(pre.crop_pct),
        "interpolation": pre.interpolation,
        "num_classes": str(entry.num_classes),
        "labels": "yes" if info.labels else "no",
        "backbone": info.backbone_spec.name,
        "backbone_fingerprint": info.backbone_fingerprint,
        "prefix_rows": str(entry.prefix_len),
    }
    return ModelConfiguration(
        name=entry.task_id,
        platform=PLATFORM,
        backend="e2vpt",
        inputs=(
            ConfigTensor(
                declared.name,
                declared.datatype,
                tuple(input_dims(declared.name, pre.input_size)),
                layout=declared.layout,
            ),
        ),
        outputs=(
            ConfigTensor(
                OUTPUT_NAME, "FP32", (entry.num_classes,), label_filename="labels" if info.labels else ""
            ),
        ),
        queue=queue,
        instance_kind="KIND_GPU" if device_type == "cuda" else "KIND_CPU",
        parameters=parameters,
    )


def statistics_of(entry: TaskEntry, stats: TaskStats, device_type: str) -> ModelStatistics:
    return ModelStatistics(
        name=entry.task_id,
        version=str(entry.version),
        stats=stats,
        memory_kind="GPU" if device_type == "cuda" else "CPU",
        memory_bytes=entry.nbytes,
    )
