"""KServe v2 / Triton HTTP bodies to and from the transport-neutral ``protocol`` and ``model_info`` types.

An inference body is JSON, or JSON followed by binary tensors (Triton's binary tensor extension):
the header ``Inference-Header-Content-Length`` gives the JSON's length, and each input whose
``parameters.binary_data_size`` is set takes that many bytes of the rest, in input order.
Answers put an output in binary when it asks for ``binary_data`` (or the request for
``binary_data_output`` and names no outputs, as tritonclient does), else as a JSON list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from runtime.serving import grpc_codec
from runtime.serving.metrics import Duration
from runtime.serving.model_info import ModelConfiguration, ModelMetadata, ModelStatistics, ServerMetadata
from runtime.serving.preprocess import InputError
from runtime.serving.protocol import InferRequest, InferResponse, InputTensor, RequestedOutput
from runtime.serving.task_store import IndexEntry

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
BINARY_ALL_OUTPUTS = "binary_data_output"
# Output parameters that choose the encoding here, not the answer: the service never sees them.
ENCODING_PARAMETERS = frozenset({BINARY_OUTPUT})
Parameters = dict[str, bool | int | float | str]


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """``body`` parsed as one JSON object; ``InputError`` otherwise (empty: an empty object)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object")
    return value


def infer_request(
    model_name: str, model_version: str, body: bytes, header_length: str | None
) -> tuple[InferRequest, bool]:
    """The neutral request and whether outputs default to binary; ``InputError`` if malformed."""
    length = _header_length(header_length, len(body))
    message = json_object(body[:length], "inference request")
    binary = memoryview(body)[length:]
    offset = 0
    inputs = []
    for index, tensor in enumerate(_list(message, "inputs")):
        spec = _object(tensor, f"inputs[{index}]")
        name, datatype = _text(spec, "name", index), _text(spec, "datatype", index)
        shape = _shape(spec.get("shape"), index)
        params = _parameters(spec.get("parameters"), f"inputs[{index}].parameters")
        size = params.get(BINARY_SIZE)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InputError(f"inputs[{index}].parameters.{BINARY_SIZE} must be a non-negative integer")
            if offset + size > len(binary):
                raise InputError(
                    f"input {name[:64]!r} declares {size} binary bytes; only {len(binary) - offset} follow"
                )
            inputs.append(InputTensor(name, datatype, shape, raw=bytes(binary[offset : offset + size])))
            offset += size
        elif "data" in spec:
            inputs.append(InputTensor(name, datatype, shape, values=_flat(spec["data"], datatype)))
        else:
            raise InputError(f"input {name[:64]!r} has neither 'data' nor binary data")
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data follow that no input declares")
    outputs = []
    for index, output in enumerate(_list(message, "outputs", required=False)):
        spec = _object(output, f"outputs[{index}]")
        params = _parameters(spec.get("parameters"), f"outputs[{index}].parameters")
        outputs.append(RequestedOutput(_text(spec, "name", index), params))
    request_params = _parameters(message.get("parameters"), "parameters")
    request_id = message.get("id", "")
    if not isinstance(request_id, str):
        raise InputError("'id' must be a string")
    binary_default = bool(request_params.pop(BINARY_ALL_OUTPUTS, False))  # HTTP's encoding, not the answer
    return InferRequest(
        model_name, inputs, model_version, request_id, outputs, request_params
    ), binary_default


def without_encoding(request: InferRequest) -> tuple[InferRequest, list[bool]]:
    """The request with HTTP-only output parameters removed, and which outputs want binary."""
    binary = [bool(output.parameters.get(BINARY_OUTPUT, False)) for output in request.outputs]
    outputs = [
        RequestedOutput(
            output.name, {k: v for k, v in output.parameters.items() if k not in ENCODING_PARAMETERS}
        )
        for output in request.outputs
    ]
    return replace(request, outputs=outputs), binary


def infer_response(response: InferResponse, binary: Sequence[bool]) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when binary outputs follow it (else None)."""
    outputs, chunks = [], []
    for index, output in enumerate(response.outputs):
        spec: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if index < len(binary) and binary[index]:
            raw = output.raw()
            spec["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        elif output.datatype == "BYTES":
            spec["data"] = [item.decode("utf-8", "replace") for item in output.data.ravel()]
        else:
            spec["data"] = output.data.ravel().tolist()
        outputs.append(spec)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return text, None
    return text + b"".join(chunks), len(text)


def server_metadata(metadata: ServerMetadata) -> dict[str, Any]:
    return {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}


def model_metadata(metadata: ModelMetadata) -> dict[str, Any]:
    def tensors(items: Iterable[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


def model_config(config: ModelConfiguration) -> dict[str, Any]:
    """Triton's JSON form of the configuration: the protobuf's fields under their proto names, and
    64-bit integers as JSON numbers (protobuf's JSON writes them as strings; Triton, and the
    clients that read its config such as perf_analyzer, use numbers)."""
    message = grpc_codec.model_config(config)
    return _int64_as_numbers(message, json_format.MessageToDict(message, preserving_proto_field_name=True))


INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _int64_as_numbers(message: Message, value: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        if field.name not in value:
            continue
        if field.type in INT64_TYPES:
            value[field.name] = (
                [int(v) for v in value[field.name]] if _repeated(field) else int(value[field.name])
            )
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            nested = getattr(message, field.name)
            if _repeated(field):
                value[field.name] = [
                    _int64_as_numbers(m, v) for m, v in zip(nested, value[field.name], strict=True)
                ]
            else:
                value[field.name] = _int64_as_numbers(nested, value[field.name])
    return value


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _duration(value: Duration) -> dict[str, int]:
    return {"count": value.count, "ns": value.ns}


def model_statistics(models: Sequence[ModelStatistics]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` with numbers as JSON numbers, as Triton answers."""
    phases = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    listed = []
    for model in models:
        stats = model.stats
        listed.append(
            {
                "name": model.name,
                "version": model.version,
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.inference_count,
                "execution_count": stats.execution_count,
                "inference_stats": {name: _duration(getattr(stats, name)) for name in phases},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(stats.batches[size].compute_input),
                        "compute_infer": _duration(stats.batches[size].compute_infer),
                        "compute_output": _duration(stats.batches[size].compute_output),
                    }
                    for size in sorted(stats.batches)
                ],
                "memory_usage": [{"type": model.memory_kind, "id": 0, "byte_size": model.memory_bytes}],
            }
        )
    return {"model_stats": listed}


def repository_index(entries: Iterable[IndexEntry]) -> list[dict[str, str]]:
    return [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]


def control_parameters(body: bytes) -> dict[str, object]:
    """The parameters of a load/unload body (``{"parameters": {...}}``)."""
    return dict(_parameters(json_object(body, "request").get("parameters"), "parameters"))


# -- JSON shapes -----------------------------------------------------------------------------------


def _header_length(header: str | None, body_length: int) -> int:
    if header is None:
        return body_length
    try:
        length = int(header)
    except ValueError:
        raise InputError(f"{HEADER_LENGTH} must be an integer, got {header[:32]!r}") from None
    if not 0 <= length <= body_length:
        raise InputError(f"{HEADER_LENGTH} is {length}, the body has {body_length} bytes")
    return length


def _list(message: Mapping[str, Any], key: str, required: bool = True) -> list[Any]:
    value = message.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise InputError(f"'{key}' must be a list")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object")
    return value


def _text(spec: Mapping[str, Any], key: str, index: int) -> str:
    value = spec.get(key)
    if not isinstance(value, str):
        raise InputError(f"tensor {index}: '{key}' must be a string")
    return value


def _shape(value: Any, index: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InputError(f"inputs[{index}].shape must be a list of integers")
    return tuple(value)


def _parameters(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, bool | int | float | str) for v in value.values()
    ):
        raise InputError(f"{where} must be an object of booleans, numbers and strings")
    return dict(value)


def _flat(data: Any, datatype: str) -> list[Any]:
    """JSON tensor data (flat or nested row-major lists) as a flat list; BYTES strings as bytes."""
    flat: list[Any] = []
    stack = [data] if not isinstance(data, list) else list(reversed(data))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise InputError("BYTES data in JSON must be strings (send binary data for raw bytes)")
        return [item.encode() for item in flat]
    return flat
