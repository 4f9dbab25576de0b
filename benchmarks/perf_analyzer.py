"""NVIDIA's perf_analyzer, unchanged, against the demo server over gRPC and HTTP.

A real server (``python -m runtime serve``: the embedded ViT-Ti with seeded random weights and the
demo tasks, on loopback and free ports) is measured by ``perf_analyzer -m demo-task-0 -i grpc|http``
with no ``--shape`` and no data file: the metadata declares one static input (``pixels``), which
perf_analyzer fills with random data. For each protocol and concurrency it records perf_analyzer's
CSV (throughput, client latency percentiles, and the server-side breakdown it reads from the
statistics extension: queue, compute input/infer/output) through ``benchmarks/report.py``. The
"server share" column is the server's queue + compute time over the client's average latency: what
is left is the network and the client.

perf_analyzer ships in Triton's SDK container (``nvcr.io/nvidia/tritonserver:<version>-py3-sdk``) or
as a build from triton-inference-server/perf_analyzer; it is not on PyPI. Without it this script
says so and exits with status 2.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    benchmark_parser,
    config_record,
    free_port,
    machine,
    parse_config,
    served_subprocess,
)
from benchmarks.report import Report, Table, publish

MISSING = 2
READY_TIMEOUT_SECONDS = 300
# perf_analyzer's CSV columns (microseconds) that the report keeps, under shorter names.
COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_us",
    "Server Queue": "queue_us",
    "Server Compute Input": "compute_input_us",
    "Server Compute Infer": "compute_infer_us",
    "Server Compute Output": "compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
}
SERVER_PARTS = ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")


@dataclass(frozen=True)
class PerfConfig:
    binary: str = "perf_analyzer"
    task: str = "demo-task-0"
    tasks: int = 4
    protocols: tuple[str, ...] = ("grpc", "http")
    concurrency: tuple[int, ...] = (1, 4, 16)
    measurement_ms: int = 5000
    threads: int | None = None
    seed: int = 0
    output_dir: Path | None = RESULTS_DIR


QUICK = {"concurrency": (1, 4), "measurement_ms": 2000, "output_dir": RESULTS_DIR / "quick"}


def find_binary(name: str) -> str | None:
    """The perf_analyzer executable: a path, or a name looked up on PATH."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name)


@contextmanager
def demo_server(config: PerfConfig, task_dir: Path) -> Iterator[tuple[int, int]]:
    """``python -m runtime serve`` over the demo tasks; yields (gRPC port, HTTP port) once ready."""
    port, http_port = free_port(), free_port()
    arguments = [
        "--weights", "random", "--seed", str(config.seed), "--device", "cpu", "--task-dir", str(task_dir),
        "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port), "--no-metrics",
    ]  # fmt: skip
    if config.threads:
        arguments += ["--threads", str(config.threads)]
    with served_subprocess(arguments, port, READY_TIMEOUT_SECONDS, config.task):
        yield port, http_port


def parse_csv(text: str) -> list[dict[str, float]]:
    """perf_analyzer's ``-f`` CSV as rows of the kept columns, with the server share added."""
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        row = {short: float(record[name]) for name, short in COLUMNS.items() if record.get(name)}
        if row.get("avg_us"):
            row["server_share"] = sum(row.get(part, 0.0) for part in SERVER_PARTS) / row["avg_us"]
        rows.append(row)
    return rows


def measure(
    binary: str, config: PerfConfig, protocol: str, url: str, concurrency: int
) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "perf.csv"
        command = [
            binary, "-m", config.task, "-i", protocol, "-u", url,
            "--concurrency-range", str(concurrency), "--measurement-interval", str(config.measurement_ms),
            "-f", str(output),
        ]  # fmt: skip
        subprocess.run(command, check=True, timeout=600)
        return parse_csv(output.read_text())


def run(config: PerfConfig, binary: str) -> dict[str, Any]:
    from runtime.demo import default_backbone, write_demo_tasks

    rows = []
    with tempfile.TemporaryDirectory() as task_dir:
        write_demo_tasks(default_backbone(), task_dir, config.tasks)
        with demo_server(config, Path(task_dir)) as (port, http_port):
            for protocol in config.protocols:
                url = f"127.0.0.1:{port if protocol == 'grpc' else http_port}"
                for concurrency in config.concurrency:
                    for row in measure(binary, config, protocol, url, concurrency):
                        rows.append({"protocol": protocol, **row})
    return {"benchmark": "perf_analyzer", "config": config_record(config), "machine": machine(), "rows": rows}


def build_report(results: dict[str, Any]) -> Report:
    table = Table(
        results["rows"],
        title=f"perf_analyzer -m {results['config']['task']} (microseconds)",
        text="Server parts from the statistics extension; server share = (queue + compute) / avg latency.",
    )
    return Report("perf_analyzer", "perf_analyzer against the demo server", results["machine"], [table])


def parse_args(argv: Sequence[str] | None) -> PerfConfig:
    defaults = PerfConfig()
    parser = benchmark_parser("perf_analyzer", __doc__, "two concurrencies, 2 s windows")
    parser.add_argument("--binary", help=f"perf_analyzer executable (default {defaults.binary!r} on PATH)")
    parser.add_argument("--protocols", nargs="+", choices=("grpc", "http"), help="default both")
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"default {list(defaults.concurrency)}")
    parser.add_argument("--measurement-ms", type=int, help=f"default {defaults.measurement_ms}")
    parser.add_argument("--threads", type=int, help="intra-op threads of the server")
    config = parse_config(parser, argv, defaults, QUICK)
    return PerfConfig(
        **{**vars(config), "protocols": tuple(config.protocols), "concurrency": tuple(config.concurrency)}
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    binary = find_binary(config.binary)
    if binary is None:
        print(
            f"perf_analyzer not found ({config.binary!r}): it is not on PyPI; run this where Triton's SDK "
            "is installed (nvcr.io/nvidia/tritonserver:<version>-py3-sdk) or pass --binary PATH",
            file=sys.stderr,
        )
        return MISSING
    results = run(config, binary)
    publish(build_report(results), results, config.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
