"""Files the runtime writes and reads.

Writes are atomic: readers see the old file or the whole new one, never half of either. Reads of
safetensors files copy the whole file into process memory first: the tensors returned never map
the file, so a file overwritten in place or truncated afterwards cannot change them or fault the
process (a mapped file that shrinks raises SIGBUS on the next access).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Temporary files of ``atomic_write``: ``.<target name>.<8 hex digits>.e2vpt-tmp``.
TEMP_SUFFIX = ".e2vpt-tmp"
TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
# A writer that was killed cannot remove its temporary file; a later run removes it once it is
# this old (a live writer's file is younger: it is written at once, then renamed).
STALE_TEMP_SECONDS = 3600.0

# The safetensors format's own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 2**20
# Tensors have a handful of dimensions; this only bounds what a hostile header can ask torch to build.
MAX_TENSOR_DIMS = 8
MAX_DIMENSION = 2**31 - 1
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def atomic_write(path: Path, produce: Callable[[], bytes]) -> Path:
    """Write ``produce()`` to ``path`` via a fsynced temp file in the same folder and a rename.

    The file gets the permissions a plain ``open(path, "w")`` would (``0o666`` less the umask).
    On any exception (``KeyboardInterrupt`` and ``SystemExit`` included) the temp file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = produce()
    temporary, descriptor = _create_temporary(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _create_temporary(path: Path) -> tuple[Path, int]:
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            # O_EXCL: never write into someone else's file; mode 0o666 lets the umask decide, as open() does.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(directory: Path, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the temp files of ``atomic_write`` calls that were killed, once ``older_than`` seconds old."""
    cutoff = time.time() - older_than
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not TEMP_NAME.fullmatch(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file, or that changed while it was read."""


@dataclass(frozen=True)
class SafetensorsContent:
    """A safetensors file read into memory: its ``__metadata__`` and its tensors."""

    metadata: dict[str, str]
    tensors: dict[str, Tensor]


def read_safetensors(path: Path, max_bytes: int | None = None) -> SafetensorsContent:
    """Read a whole safetensors file into process memory and validate its layout.

    The tensors are views of one buffer owned by this process (never a mapping of the file).
    Raises ``SafetensorsFormatError`` for a malformed file or one over ``max_bytes``, and
    ``OSError`` when the file cannot be read.
    """
    return parse_safetensors(_read_regular_file(path, max_bytes))


def parse_safetensors(buffer: bytearray) -> SafetensorsContent:
    """A safetensors file already in memory (the buffer is used, not copied): see ``read_safetensors``."""
    header, data_start = _parse_header(buffer)
    metadata = _metadata(header)
    data_size = len(buffer) - data_start
    storage = torch.frombuffer(buffer, dtype=torch.uint8)
    tensors: dict[str, Tensor] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, begin, end = _tensor_entry(name, entry, data_size)
        spans.append((begin, end, name))
        chunk = storage[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:  # a view must start at a multiple of its element size
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).reshape(shape)
    # The format requires the tensors to tile the data section: no gaps, overlaps or trailing bytes.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsFormatError(
                f"tensor {shown(name)}: data starts at byte {begin}, expected {position} (a gap or overlap)"
            )
        position = end
    if position != data_size:
        raise SafetensorsFormatError(f"{data_size - position} bytes after the last tensor's data")
    return SafetensorsContent(metadata, tensors)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """Only the ``__metadata__`` of a safetensors file (reads the header, not the tensors)."""
    with _open_regular_file(path) as handle:
        prefix = handle.read(8)
        if len(prefix) == 8:
            (header_length,) = struct.unpack("<Q", prefix)
            prefix += handle.read(min(header_length, MAX_HEADER_BYTES))
    header, _ = _parse_header(prefix, whole_file=False)
    return _metadata(header)


def _open_regular_file(path: Path) -> io.BufferedReader:
    # O_NONBLOCK: opening a FIFO planted under the expected name must not hang the reader.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise SafetensorsFormatError("not a regular file")
    return os.fdopen(descriptor, "rb")


def _read_regular_file(path: Path, max_bytes: int | None) -> bytearray:
    with _open_regular_file(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise SafetensorsFormatError(f"file of {size:,} bytes exceeds the limit of {max_bytes:,} bytes")
        buffer = bytearray(size)
        read = handle.readinto(buffer)
        if read != size or handle.read(1):
            raise SafetensorsFormatError("the file changed size while it was read")
    return buffer


def _parse_header(buffer: bytes | bytearray, whole_file: bool = True) -> tuple[dict, int]:
    """The JSON header and where the data section starts; ``whole_file=False`` for a header-only read."""
    if len(buffer) < 8:
        raise SafetensorsFormatError(f"{len(buffer)} bytes: shorter than the 8-byte header length")
    (header_length,) = struct.unpack_from("<Q", buffer)
    if header_length > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(f"header of {header_length:,} bytes exceeds {MAX_HEADER_BYTES:,}")
    if 8 + header_length > len(buffer):
        where = "the file" if whole_file else "what could be read"
        raise SafetensorsFormatError(f"header of {header_length:,} bytes runs past the end of {where}")
    try:
        header = json.loads(bytes(buffer[8 : 8 + header_length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SafetensorsFormatError(f"header is not valid JSON ({type(error).__name__})") from error
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_length


def _metadata(header: dict) -> dict[str, str]:
    """Removes ``__metadata__`` from ``header`` and returns it (string keys and values only)."""
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError("header '__metadata__' must map strings to strings")
    return metadata


def _tensor_entry(name: str, entry: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(
            f"tensor {shown(name)}: needs exactly 'dtype', 'shape' and 'data_offsets'"
        )
    kind, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise SafetensorsFormatError(
            f"tensor {shown(name)}: dtype {shown(str(kind))} is not one of {sorted(SAFETENSORS_DTYPES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_DIMENSION for d in shape)
    ):
        raise SafetensorsFormatError(
            f"tensor {shown(name)}: shape must be at most {MAX_TENSOR_DIMS} integers in 0..{MAX_DIMENSION}"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise SafetensorsFormatError(
            f"tensor {shown(name)}: data_offsets must be [begin, end] within the {data_size:,} data bytes"
        )
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise SafetensorsFormatError(
            f"tensor {shown(name)}: shape {shape} of {kind} needs {needed:,} bytes, its data {end - begin:,}"
        )
    return dtype, shape, begin, end


def shown(text: str, limit: int = 64) -> str:
    """``repr`` of a name for a message, cut to ``limit`` characters: names can come from anyone."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
