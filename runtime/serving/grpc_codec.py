"""KServe v2 gRPC messages to and from the transport-neutral ``protocol`` and ``model_info`` types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from runtime.serving.metrics import Duration
from runtime.serving.model_info import ModelConfiguration, ModelMetadata, ModelStatistics
from runtime.serving.preprocess import InputError
from runtime.serving.protocol import InferRequest, InferResponse, InputTensor, RequestedOutput
from runtime.serving.task_store import IndexEntry

# Which typed ``contents`` field carries each datatype when raw_input_contents is not used.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The neutral request; ``InputError`` when raw contents do not pair with the inputs."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(message.inputs):
        field = CONTENTS_FIELD.get(tensor.datatype)
        inputs.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=tuple(tensor.shape),
                raw=raw[index] if raw else None,
                values=getattr(tensor.contents, field) if field and not raw else (),
            )
        )
    outputs = [RequestedOutput(output.name, parameters(output.parameters)) for output in message.outputs]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters(message.parameters),
    )


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, bool | int | float | str]:
    """InferParameter values as Python values (int64/uint64 as int, double as float)."""
    values: dict[str, bool | int | float | str] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(param, kind)
    return values


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.shape))
        message.raw_output_contents.append(output.raw())
    return message


def model_metadata(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=list(metadata.versions),
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in metadata.outputs],
    )


def _config_type(datatype: str) -> Any:
    """Triton's config enum for a protocol datatype (BYTES is TYPE_STRING there)."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(config: ModelConfiguration) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=config.queue.max_batch_size,
        input=[
            mc.ModelInput(
                name=tensor.name,
                data_type=_config_type(tensor.datatype),
                format=mc.ModelInput.Format.Value(tensor.layout),
                dims=list(tensor.dims),
                optional=tensor.optional,
            )
            for tensor in config.inputs
        ],
        output=[
            mc.ModelOutput(
                name=tensor.name,
                data_type=_config_type(tensor.datatype),
                dims=list(tensor.dims),
                label_filename=tensor.label_filename,
            )
            for tensor in config.outputs
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=config.queue.max_queue_delay_us,
            priority_levels=config.queue.priority_levels,
            default_priority_level=config.queue.default_priority_level,
            # Per-request timeouts (the ``timeout`` parameter) reject a request still queued.
            default_queue_policy=mc.ModelQueuePolicy(
                allow_timeout_override=True, max_queue_size=config.queue.max_queue_size
            ),
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{config.name}_0", kind=mc.ModelInstanceGroup.Kind.Value(config.instance_kind), count=1
            )
        ],
        parameters={key: mc.ModelParameter(string_value=value) for key, value in config.parameters.items()},
    )


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(models: Sequence[ModelStatistics]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for model in models:
        stats = model.stats
        message = response.model_stats.add(
            name=model.name,
            version=model.version,
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        inference = message.inference_stats
        for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            getattr(inference, name).CopyFrom(_duration(getattr(stats, name)))
        for size in sorted(stats.batches):
            batch = stats.batches[size]
            message.batch_stats.add(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
        message.memory_usage.add(type=model.memory_kind, id=0, byte_size=model.memory_bytes)
    return response


def repository_index(entries: Iterable[IndexEntry]) -> pb.RepositoryIndexResponse:
    response = pb.RepositoryIndexResponse()
    for entry in entries:
        response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
    return response


def repository_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> dict[str, object]:
    """A load/unload request's parameters as plain values (``None`` for one that sets no value)."""
    values: dict[str, object] = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[name] = None if choice is None else getattr(parameter, choice)
    return values
