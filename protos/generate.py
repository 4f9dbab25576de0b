"""Regenerate the Python stubs from the .proto files: ``python -m protos.generate [OUT_DIR]``.

Runs ``grpc_tools.protoc`` and rewrites its output so the modules import each other as
``protos.<name>_pb2`` and register their descriptors in ``protos.POOL`` (see ``protos/__init__``).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto")
WITH_SERVICE = ("grpc_service.proto",)


def _rewrite(source: str) -> str:
    source = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from protos import \1 as \2", source, flags=re.M)
    source = source.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from protos import POOL as _POOL\n",
    )
    return source.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Write ``*_pb2.py`` (every proto) and ``*_pb2_grpc.py`` (protos with a service) into ``out_dir``."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        for proto in PROTOS:
            args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={scratch}"]
            if proto in WITH_SERVICE:
                args.append(f"--grpc_python_out={scratch}")
            if protoc.main([*args, str(PROTO_DIR / proto)]) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        for produced in sorted(Path(scratch).glob("*.py")):
            target = out_dir / produced.name
            target.write_text(_rewrite(produced.read_text()))
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
