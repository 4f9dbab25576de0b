"""Atomic writes: permissions as a plain write gives, no temporary file left by a failing or killed writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.core import files
from runtime.core.files import TEMP_SUFFIX, atomic_write, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        written = atomic_write(tmp_path / "out.bin", lambda: b"data")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"data")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777


def test_a_failing_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out.bin").write_bytes(b"old")

    def broken_fsync(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "out.bin", lambda: b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_a_terminated_exporter_removes_its_temporary_file(tmp_path: Path) -> None:
    """SIGTERM arrives mid-write (between writing and the rename): the exporter's handler unwinds."""
    script = f"""
import os, signal
from pathlib import Path
from exporter.cli import exit_on_termination
from runtime.core import files

exit_on_termination()
files.os.fsync = lambda descriptor: os.kill(os.getpid(), signal.SIGTERM)
files.atomic_write(Path({str(tmp_path / "big.bin")!r}), lambda: bytes(10_000_000))
print("not reached")
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "not reached" not in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    stale = tmp_path / f".task.safetensors.0123abcd{TEMP_SUFFIX}"
    fresh = tmp_path / f".task.safetensors.89abcdef{TEMP_SUFFIX}"
    other = tmp_path / ".notes.tmp"
    for path in (stale, fresh, other):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3700
    os.utime(stale, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name])
    assert remove_stale_temporaries(tmp_path / "absent") == []
