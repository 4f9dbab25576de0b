"""The served protocol matches the one tritonclient speaks, and the stubs regenerate identically."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from protos import generate
from protos import grpc_service_pb2 as ours_service
from protos import model_config_pb2 as ours_config


def _field_table(message: Descriptor) -> dict[str, tuple[int, int, bool, str]]:
    table = {}
    for f in message.fields:
        kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")
        table[f.name] = (f.number, f.type, f.is_repeated, kind)
    return table


def _messages(file: FileDescriptor) -> dict[str, Descriptor]:
    found = {}

    def walk(message: Descriptor) -> None:
        found[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def test_every_message_field_matches_tritonclient():
    for ours_file, theirs_file in ((ours_service, triton_service), (ours_config, triton_config)):
        theirs = _messages(theirs_file.DESCRIPTOR)
        ours = _messages(ours_file.DESCRIPTOR)
        assert ours, ours_file
        for name, message in ours.items():
            assert name in theirs, f"{name} is not in the protocol"
            their_fields = _field_table(theirs[name])
            for field, spec in _field_table(message).items():
                assert their_fields.get(field) == spec, (
                    f"{name}.{field}: ours {spec}, protocol {their_fields.get(field)}"
                )


def test_enums_and_service_match_tritonclient():
    theirs = triton_config.DESCRIPTOR.enum_types_by_name["DataType"]
    ours = ours_config.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}
    their_service = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    our_service = ours_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert our_service.full_name == "inference.GRPCInferenceService"
    for method in our_service.methods:
        theirs_method = their_service.methods_by_name[method.name]
        assert method.input_type.full_name == theirs_method.input_type.full_name
        assert method.output_type.full_name == theirs_method.output_type.full_name
    assert len(our_service.methods) == 18


def test_generated_stubs_are_reproducible(tmp_path):
    written = generate.generate(tmp_path)
    committed = Path(generate.__file__).parent
    stubs = [*committed.glob("*_pb2*.py"), *committed.glob("*_pb2.pyi")]
    assert sorted(p.name for p in written) == sorted(p.name for p in stubs)
    for path in written:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} differs; run python -m protos.generate"
        )


def test_generate_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    assert "out_dir" in capsys.readouterr().out
