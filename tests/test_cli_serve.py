"""The serve command line: defaults shown, log options after the command, the backbone the tasks record."""

from __future__ import annotations

import argparse

import pytest

from runtime import cli
from runtime.demo import default_backbone, write_demo_tasks
from tests.server_helpers import write_tasks


@pytest.fixture
def parsed(monkeypatch) -> list[argparse.Namespace]:
    """The namespaces ``serve`` would have run with (nothing is served)."""
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "cmd_serve", lambda args: seen.append(args) or 0)
    return seen


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000)" in text and "(default: 8001)" in text and "(default: pixels)" in text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--log-format", "json", "--weights", "random", "--task-dir", "t"], ("json", "INFO")),
        (["--log-format", "json", "serve", "--weights", "random", "--task-dir", "t"], ("json", "INFO")),
        (["--log-level", "DEBUG", "serve", "--weights", "random", "--task-dir", "t"], ("text", "DEBUG")),
        (["serve", "--weights", "random", "--task-dir", "t", "--log-level", "WARNING"], ("text", "WARNING")),
    ],
)
def test_log_options_before_or_after_the_command(parsed, argv, expected):
    assert cli.main(argv) == 0
    assert (parsed[0].log_format, parsed[0].log_level) == expected


def test_http_options(parsed):
    cli.main(["serve", "--weights", "random", "--task-dir", "t", "--http-port", "0"])
    cli.main(["serve", "--weights", "random", "--task-dir", "t", "--no-http", "--host", "127.0.0.1"])
    first, second = (cli.server_config(args) for args in parsed)
    assert first.http_port == 0 and first.port == 8001 and first.metrics_host == "0.0.0.0"
    assert second.http_port is None and second.metrics_host == "127.0.0.1"


def test_random_weights_take_the_architecture_the_packages_record(tmp_path, tiny_backbone):
    write_demo_tasks(default_backbone(), tmp_path, 2)
    assert cli.recorded_backbone(tmp_path) == default_backbone().spec
    (tmp_path / "broken.safetensors").write_bytes(b"not a package")
    assert cli.recorded_backbone(tmp_path) == default_backbone().spec  # unreadable ones do not count
    write_tasks(tiny_backbone, tmp_path, 1)  # a second architecture: the user must name one
    assert cli.recorded_backbone(tmp_path) is None
    assert cli.recorded_backbone(tmp_path / "empty") is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (True, True)),
        (["--strict-readiness=false", "--exit-on-error", "false"], (False, False)),
        (["--strict-readiness", "--exit-on-error=1"], (True, True)),
    ],
)
def test_tritons_readiness_flags(parsed, flags, expected):
    cli.main(["serve", "--weights", "random", "--task-dir", "t", *flags])
    config = cli.server_config(parsed[0])
    assert (config.strict_readiness, config.exit_on_error) == expected


def test_a_bad_boolean_is_refused(parsed, capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--weights", "random", "--task-dir", "t", "--strict-readiness=maybe"])
    assert "expected true or false" in capsys.readouterr().err
