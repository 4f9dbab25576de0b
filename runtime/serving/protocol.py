"""The inference protocol's data, whatever the transport: requests, responses, and their validation.

KServe v2 / Open Inference Protocol requests over gRPC and over HTTP/JSON carry the same things:
named tensors with a datatype, a shape, and either raw little-endian bytes or a list of values.
Transports convert their messages into ``InferRequest`` and ``InferResponse`` back; everything
here (which inputs a task accepts, shape and size limits, the BYTES layout, top-k strings) is
decided once for both. Validation only reads shapes and sizes before it touches data, and sizes
are Python integers, so a shape whose product overflows int64 is refused, not wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from runtime.core.files import shown
from runtime.serving.preprocess import InputError

SERVER_NAME = "e2vpt-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("classification", "model_repository", "statistics")
PLATFORM = "e2vpt_vit"
OUTPUT_NAME = "logits"
CLASS_COUNT = "classification"


@dataclass(frozen=True)
class InputForm:
    """One accepted input: name, protocol datatype, and its layout in Triton's config terms."""

    name: str
    datatype: str
    layout: str


INPUTS = {
    "image": InputForm("image", "BYTES", "FORMAT_NONE"),
    "pixels": InputForm("pixels", "UINT8", "FORMAT_NHWC"),
    "input": InputForm("input", "FP32", "FORMAT_NCHW"),
}


def input_dims(name: str, input_size: int) -> list[int]:
    """Declared dims without the batch dimension, as ModelConfig reports them. Static, so tools
    that make up inputs from the metadata (perf_analyzer) can; ``pixels`` of any size are still
    accepted."""
    return {"image": [1], "pixels": [input_size, input_size, 3], "input": [3, input_size, input_size]}[name]


# -- requests and responses ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputTensor:
    """One request tensor: ``raw`` little-endian bytes (BYTES: the length-prefixed layout of
    ``serialize_bytes``) or ``values``, a flat sequence (``bytes`` items for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    values: Sequence[Any] = ()


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asks for, with its parameters (``classification``: top-k as strings)."""

    name: str
    parameters: Mapping[str, bool | int | float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """``parameters``: the request's own (Triton's ``priority``, ``timeout``; see ``parse_options``)."""

    model_name: str
    inputs: Sequence[InputTensor]
    model_version: str = ""
    id: str = ""
    outputs: Sequence[RequestedOutput] = ()
    parameters: Mapping[str, bool | int | float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """``data``: FP32 array, or an object array of ``bytes`` for BYTES; ``shape`` is its shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray

    def raw(self) -> bytes:
        """The protocol's raw layout of ``data`` (little-endian; BYTES length-prefixed)."""
        if self.datatype == "BYTES":
            return serialize_bytes(list(self.data.ravel()))
        return self.data.astype("<f4").tobytes()


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: tuple[OutputTensor, ...]


# -- validated inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImages:
    items: list[bytes]


@dataclass(frozen=True)
class Pixels:
    array: np.ndarray  # uint8 [N, H, W, 3]


@dataclass(frozen=True)
class Normalized:
    array: np.ndarray  # fp32 [N, 3, S, S]


ClientInput = EncodedImages | Pixels | Normalized


@dataclass(frozen=True)
class InputLimits:
    max_batch_size: int
    max_image_pixels: int


@dataclass(frozen=True)
class OutputRequest:
    """A validated output: ``class_count`` 0 means raw logits, k > 0 the top-k strings."""

    name: str
    class_count: int


def parse_input(request: InferRequest, input_size: int, limits: InputLimits) -> ClientInput:
    """The request's single input as typed values; ``InputError`` names what is wrong."""
    if len(request.inputs) != 1:
        names = [shown(tensor.name) for tensor in request.inputs[:4]]
        raise InputError(
            f"send exactly one input, one of {sorted(INPUTS)}; got {len(request.inputs)}: {names}"
        )
    tensor = request.inputs[0]
    form = INPUTS.get(tensor.name)
    if form is None:
        raise InputError(f"unknown input {shown(tensor.name)}; accepted: {sorted(INPUTS)} (exactly one)")
    if tensor.datatype != form.datatype:
        raise InputError(
            f"input {form.name!r} must have datatype {form.datatype}, got {tensor.datatype[:16]}"
        )
    shape = list(tensor.shape)
    if len(shape) > 4 or any(dim <= 0 for dim in shape):
        raise InputError(f"input {form.name!r} has shape {shape[:8]}; use at most 4 positive dimensions")
    if not shape or shape[0] > limits.max_batch_size:
        raise InputError(
            f"input {form.name!r} has shape {shape}; its batch dimension must be 1..{limits.max_batch_size}"
        )
    if form.name == "image":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InputError(f"input 'image' must have shape [N] or [N, 1], got {shape}")
        items = deserialize_bytes(tensor.raw) if tensor.raw is not None else list(tensor.values)
        if len(items) != shape[0]:
            raise InputError(f"input 'image' has {len(items)} elements, shape {shape} needs {shape[0]}")
        if not all(isinstance(item, bytes) for item in items):
            raise InputError("input 'image' elements must be bytes")
        return EncodedImages(items)
    if form.name == "pixels":
        if len(shape) != 4 or shape[3] != 3:
            raise InputError(f"input 'pixels' must have shape [N, H, W, 3], got {shape}")
        if shape[1] * shape[2] > limits.max_image_pixels:
            raise InputError(
                f"input 'pixels' images of {shape[2]}x{shape[1]} exceed {limits.max_image_pixels} pixels"
            )
        return Pixels(_array(tensor, np.dtype(np.uint8), shape))
    expected = [shape[0], 3, input_size, input_size]
    if shape != expected:
        raise InputError(f"input must be FP32 [N, 3, {input_size}, {input_size}], got {shape}")
    return Normalized(_array(tensor, np.dtype("<f4"), shape))


def _array(tensor: InputTensor, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """The tensor's data as a writable array of ``shape``, after checking its size."""
    count = math.prod(shape)
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise InputError(
                f"input {tensor.name!r} has {len(tensor.raw)} bytes; "
                f"shape {shape} of {dtype.name} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype).reshape(shape).copy()
    if len(tensor.values) != count:
        raise InputError(
            f"input {tensor.name!r} has {len(tensor.values)} values; shape {shape} needs {count}"
        )
    try:
        values = np.asarray(tensor.values, dtype=dtype if dtype.kind == "f" else np.int64)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"input {tensor.name!r} holds values that are not numbers") from None
    if dtype == np.uint8 and values.size and (int(values.min()) < 0 or int(values.max()) > 255):
        raise InputError(f"input {tensor.name!r} holds values outside 0..255, which UINT8 cannot")
    return values.astype(dtype, copy=False).reshape(shape)


@dataclass(frozen=True)
class RequestOptions:
    """A request's queue controls: ``priority`` 0 means the default level; ``timeout_us`` 0 none."""

    priority: int = 0
    timeout_us: int = 0


# Request parameters tritonclient sends for sequences; only "no sequence" is served here.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
REQUEST_PARAMETERS = ("priority", "timeout", *SEQUENCE_PARAMETERS)


def parse_options(parameters: Mapping[str, bool | int | float | str], priority_levels: int) -> RequestOptions:
    """Triton's request parameters: ``priority`` (1 is the highest of ``priority_levels``; 0 the
    default level) and ``timeout`` (microseconds in the queue). Others are refused, not ignored."""
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
    if unknown:
        raise InputError(
            f"unknown request parameters {', '.join(shown(name) for name in unknown[:4])}; "
            f"known: {', '.join(REQUEST_PARAMETERS)}"
        )
    if any(parameters.get(name) not in (None, 0, "", False) for name in SEQUENCE_PARAMETERS):
        raise InputError("sequence batching is not supported: tasks are stateless, send no sequence_id")
    priority = _whole(parameters, "priority")
    if priority and not priority_levels:
        raise InputError("priority is not enabled on this server (start it with --priority-levels N)")
    if priority > priority_levels:
        raise InputError(f"priority {priority} is not a level: use 1 (highest) .. {priority_levels}, or 0")
    return RequestOptions(priority, _whole(parameters, "timeout"))


def _whole(parameters: Mapping[str, bool | int | float | str], name: str) -> int:
    value = parameters.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(
            f"request parameter {name!r} must be a non-negative integer, got {str(value)[:32]!r}"
        )
    return value


def parse_outputs(outputs: Sequence[RequestedOutput], task_id: str) -> list[OutputRequest]:
    """The requested outputs; ``logits`` as raw FP32 when none is requested."""
    if not outputs:
        return [OutputRequest(OUTPUT_NAME, 0)]
    if len(outputs) > 1:
        raise InputError(f"request one output, {OUTPUT_NAME!r}; got {len(outputs)}")
    output = outputs[0]
    if output.name != OUTPUT_NAME:
        raise InputError(
            f"unknown output {shown(output.name)}; task {shown(task_id)} has one output, {OUTPUT_NAME!r}"
        )
    count = output.parameters.get(CLASS_COUNT, 0)
    if isinstance(count, bool) or not isinstance(count, int):
        raise InputError(f"{CLASS_COUNT} must be an integer, got {type(count).__name__}")
    if count < 0:
        raise InputError(f"{CLASS_COUNT} must be >= 0, got {count}")
    return [OutputRequest(output.name, count)]


# -- encodings -------------------------------------------------------------------------------------


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """The protocol's BYTES tensor layout: each element as 4-byte little-endian length + bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError("BYTES input is malformed: truncated 4-byte length prefix")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InputError(f"BYTES input is malformed: element of {length} bytes runs past the end")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def classification_strings(logits: Tensor, count: int, labels: Sequence[str] | None) -> list[bytes]:
    """Top-``count`` per row as ``"score:index:label"`` (``"score:index"`` without labels)."""
    scores, indices = logits.topk(min(count, logits.shape[1]), dim=1)
    out = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        for score, index in zip(row_scores, row_indices, strict=True):
            text = f"{score:f}:{index}" + (f":{labels[index]}" if labels else "")
            out.append(text.encode())
    return out


def encode_outputs(
    logits: Tensor, outputs: Sequence[OutputRequest], labels: Sequence[str] | None
) -> tuple[OutputTensor, ...]:
    """Logits ``[N, C]`` as each requested output: raw FP32, or top-k strings ``[N, k]``."""
    logits = logits.float()
    encoded = []
    for output in outputs:
        if output.class_count:
            k = min(output.class_count, logits.shape[1])
            strings = np.array(classification_strings(logits, k, labels), dtype=np.object_)
            rows = strings.reshape(logits.shape[0], k)
            encoded.append(OutputTensor(output.name, "BYTES", rows.shape, rows))
        else:
            array = logits.numpy()
            encoded.append(OutputTensor(output.name, "FP32", array.shape, array))
    return tuple(encoded)
