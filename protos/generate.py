"""Regenerate the Python stubs and their type stubs from the .proto files: ``python -m protos.generate``.

Runs ``grpc_tools.protoc`` and rewrites its output so the modules import each other as
``protos.<name>_pb2`` and register their descriptors in ``protos.POOL`` (see ``protos/__init__``).
Writes ``<name>_pb2.py`` and ``<name>_pb2.pyi`` for every proto and ``<name>_pb2_grpc.py`` for the
protos with a service. The output depends on the grpcio-tools version (it names the protobuf and
grpcio versions it needs), which is why the test extra pins it.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto")
WITH_SERVICE = ("grpc_service.proto",)
GENERATED_SUFFIXES = (".py", ".pyi")


def _rewrite(source: str) -> str:
    source = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from protos import \1 as \2", source, flags=re.M)
    source = source.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        "from protos import POOL as _POOL\n",
    )
    return source.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and (protos with a service) ``*_pb2_grpc.py`` into ``out_dir``."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        for proto in PROTOS:
            args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={scratch}", f"--pyi_out={scratch}"]
            if proto in WITH_SERVICE:
                args.append(f"--grpc_python_out={scratch}")
            if protoc.main([*args, str(PROTO_DIR / proto)]) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        for produced in sorted(p for p in Path(scratch).iterdir() if p.suffix in GENERATED_SUFFIXES):
            target = out_dir / produced.name
            target.write_text(_rewrite(produced.read_text()))
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate",
        description="Regenerate the KServe v2 Python stubs (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) "
        "from the .proto files with grpc_tools.protoc.",
    )
    parser.add_argument(
        "out_dir", nargs="?", type=Path, default=PROTO_DIR, help=f"where to write them (default {PROTO_DIR})"
    )
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} is not a directory")
    for path in generate(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
