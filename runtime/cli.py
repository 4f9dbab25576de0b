"""``python -m runtime serve|demo|classify``: the server, the end-to-end demo, one-off classification."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from runtime.core.backbone import ARCHITECTURES, RANDOM_WEIGHTS, Backbone, BackboneSpec
from runtime.engines import ENGINES, InferenceEngine, make_engine
from runtime.engines.attention import BACKENDS
from runtime.engines.torch_engine import DEFAULT_MAX_BATCH_SIZE
from runtime.serving.batcher import BATCHING_MODES
from runtime.serving.preprocess import DEFAULT_MAX_PIXELS
from runtime.serving.task_store import MODES
from runtime.serving.threads import use_compute_threads, use_one_thread

log = logging.getLogger("e2vpt.cli")
_STANDARD_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_FIELDS}
        text = super().format(record)
        return text + "".join(f" {k}={v}" for k, v in extras.items())


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        choices=sorted(ARCHITECTURES),
        help="architecture (default: the one recorded in --weights by `python -m exporter backbone`; "
        "with --weights random, the one the packages in --task-dir record)",
    )
    parser.add_argument(
        "--weights", required=True, help="backbone weights (.safetensors or weights-only .pth), or 'random'"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engine", choices=ENGINES, default="torch")
    parser.add_argument("--onnx", help="exported graph for --engine onnxruntime (default: exported at start)")
    parser.add_argument("--threads", type=int, help="intra-op threads (torch or onnxruntime)")
    parser.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="torch engine's attention: auto = the Triton kernel on CUDA, PyTorch SDPA elsewhere",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="torch engine on CUDA: replay captured graphs of whole batches (up to --max-batch-size)",
    )


def recorded_backbone(task_dir: str | Path) -> BackboneSpec | None:
    """The one architecture every readable package in ``task_dir`` records (None: none, or several)."""
    from runtime.core.package import PackageError, load_package

    specs = set()
    for path in sorted(Path(task_dir).glob("*.safetensors")):
        try:
            specs.add(load_package(path, name=path.name).backbone_spec)
        except PackageError:
            continue  # the server reports it when it loads the directory
    return specs.pop() if len(specs) == 1 else None


def build_engine(args: argparse.Namespace) -> InferenceEngine:
    spec: str | BackboneSpec | None = args.backbone
    if spec is None and args.weights == RANDOM_WEIGHTS and getattr(args, "task_dir", None):
        spec = recorded_backbone(args.task_dir)  # random weights: the tasks' own architecture
    backbone = Backbone.create(spec, args.weights, seed=args.seed)
    if args.weights == RANDOM_WEIGHTS:
        log.warning(
            "backbone weights are RANDOM, not pretrained: outputs are meaningless",
            extra={"backbone": backbone.spec.name, "seed": args.seed},
        )
    backbone.to(device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    engine = make_engine(
        args.engine,
        backbone,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        max_batch_size=getattr(args, "max_batch_size", DEFAULT_MAX_BATCH_SIZE),  # serve has the option
        onnx_path=args.onnx,
        threads=args.threads,
    )
    log.info(
        "engine built",
        extra={
            "engine": args.engine,
            "backbone": backbone.spec.name,
            "dtype": args.dtype,
            "device": args.device,
            "attention": getattr(engine, "attention", "onnxruntime"),
            "cuda_graphs": args.cuda_graphs,
            "threads": args.threads or torch.get_num_threads(),
        },
    )
    return engine


def _boolean(text: str) -> bool:
    """Triton's boolean flags: ``--strict-readiness=false``, ``--exit-on-error true``, or bare."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-dir", required=True, help="directory of <task id>.safetensors packages")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (0: a free port, logged)")
    parser.add_argument(
        "--http-port", type=int, default=8000, help="HTTP/REST v2 port (0: a free port, logged)"
    )
    parser.add_argument("--no-http", action="store_true", help="serve no HTTP/REST endpoint")
    parser.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0: a free port, logged)"
    )
    parser.add_argument("--no-metrics", action="store_true", help="serve no /metrics endpoint")
    parser.add_argument("--model-control-mode", choices=MODES, default="none")
    parser.add_argument(
        "--load-task", action="append", default=[], help="explicit mode: load at start ('*': all)"
    )
    parser.add_argument("--poll-seconds", type=float, default=5.0)
    parser.add_argument(
        "--max-resident-tasks",
        type=int,
        default=None,
        help="tasks kept in the engine's tables (default: all); others load on their first request",
    )
    parser.add_argument(
        "--max-resident-mb", type=float, default=None, help="bytes of tasks kept in the tables, in MiB"
    )
    parser.add_argument(
        "--host-cache-mb",
        type=float,
        default=1024.0,
        help="with a resident budget: evicted tasks kept compiled in host memory, in MiB",
    )
    parser.add_argument(
        "--pin-task",
        action="append",
        default=[],
        help="load at start and never evict (repeatable; also the load parameter pin=true)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue-size", type=int, default=256)
    parser.add_argument(
        "--priority-levels",
        type=int,
        default=0,
        help="Triton's request priority levels, 1 the highest (0: one first-come, first-served queue)",
    )
    parser.add_argument(
        "--default-priority-level",
        type=int,
        default=0,
        help="level of requests that name no priority (0: the lowest level)",
    )
    parser.add_argument(
        "--batching",
        choices=BATCHING_MODES,
        default="mixed",
        help="mixed: requests of any tasks share a batch; per-task: one task per batch (for comparison)",
    )
    parser.add_argument("--grace-seconds", type=float, default=10.0)
    parser.add_argument("--max-message-mb", type=int, default=64)
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=512,
        help="inference requests admitted at once (decoding, queued, computing); beyond: UNAVAILABLE",
    )
    parser.add_argument(
        "--max-preprocess-backlog",
        type=int,
        default=64,
        help="requests waiting for or in decoding; beyond: UNAVAILABLE",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        help="gRPC calls of every kind at once (default: --max-inflight + 64); beyond: RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-streams-per-connection", type=int, default=128)
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are refused before decoding",
    )
    parser.add_argument(
        "--idle-timeout-seconds", type=float, default=300.0, help="close connections idle this long"
    )
    parser.add_argument(
        "--strict-readiness",
        type=_boolean,
        nargs="?",
        const=True,
        default=True,
        help="ready only when every task that should be loaded is (Triton's flag; false: once up)",
    )
    parser.add_argument(
        "--exit-on-error",
        type=_boolean,
        nargs="?",
        const=True,
        default=True,
        help="exit at start if a task package fails to load (Triton's flag; false: serve the others)",
    )
    parser.add_argument(
        "--declared-input",
        choices=("pixels", "image", "input"),
        default="pixels",
        help="the input metadata and config declare (perf_analyzer sends it); all three are accepted",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain for TLS on --port")
    parser.add_argument("--tls-key", help="PEM private key for TLS on --port")


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out", "replicas on a cluster engine (docs/scaling.md)")
    group.add_argument(
        "--cluster",
        choices=("none", "ray"),
        default="none",
        help="ray: --replicas replicas on Ray Serve behind its gRPC proxy on --port (needs .[ray])",
    )
    group.add_argument("--replicas", type=int, default=1, help="with --cluster ray")
    group.add_argument(
        "--reconcile-seconds",
        type=float,
        default=0.5,
        help="with --cluster ray, explicit mode: how often each replica applies the shared repository state",
    )


def server_config(args: argparse.Namespace) -> Any:
    from runtime.serving.server import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        http_port=None if args.no_http else args.http_port,
        task_dir=args.task_dir,
        model_control_mode=args.model_control_mode,
        load_tasks=args.load_task,
        poll_seconds=args.poll_seconds,
        max_resident_tasks=args.max_resident_tasks,
        max_resident_mb=args.max_resident_mb,
        host_cache_mb=args.host_cache_mb,
        pin_tasks=args.pin_task,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        priority_levels=args.priority_levels,
        default_priority_level=args.default_priority_level,
        batching=args.batching,
        grace_seconds=args.grace_seconds,
        max_message_mb=args.max_message_mb,
        max_inflight=args.max_inflight,
        max_preprocess_backlog=args.max_preprocess_backlog,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection,
        max_image_pixels=args.max_image_pixels,
        declared_input=args.declared_input,
        strict_readiness=args.strict_readiness,
        exit_on_error=args.exit_on_error,
        idle_timeout_seconds=args.idle_timeout_seconds,
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_host=args.host,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        threads=args.threads,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """gRPC and the event loop on a background thread; batches on this, the main, thread.

    The main thread is the only one that computes with many intra-op threads (runtime/serving/threads.py).
    SIGTERM/SIGINT start the graceful stop; ``batcher.run()`` returns once the queue has drained.
    """
    if args.cluster == "ray":
        from runtime.scaleout.ray_app import serve_forever

        return serve_forever(args)
    from runtime.serving.server import BackgroundServer, InferenceServer

    use_compute_threads(args.threads)
    engine = build_engine(args)
    server = InferenceServer(engine, replace(server_config(args), batcher_thread=False))
    background = BackgroundServer(server)
    with background:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: background.request_stop())
        server.batcher.run()
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from runtime.core.package import load_package
    from runtime.serving.preprocess import encoded_to_input

    use_compute_threads(args.threads)
    engine = build_engine(args)
    print(f"backbone {engine.backbone.spec.name}, weights: {engine.backbone.source}")
    for task_file in args.task:
        engine.registry.add(load_package(task_file, engine.backbone))
    for task_id, entry in sorted(engine.registry.snapshot.tasks.items()):
        pre = entry.info.preprocess
        images = encoded_to_input([Path(path).read_bytes() for path in args.images], pre)
        logits = engine.forward(images, [task_id] * len(args.images))
        print(f"task {task_id} (version {entry.version})")
        for path, row in zip(args.images, logits, strict=True):
            scores, indices = row.topk(min(args.top_k, row.numel()))
            labels = entry.info.labels
            best = ", ".join(
                f"{labels[i] if labels else i}={s:.4f}"
                for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
            )
            print(f"  {path}: {best}")
    return 0


def demo_images(count: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Generated PNG images of varying sizes (gradients and noise): inputs for the demo."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    images = []
    for index in range(count):
        height, width = size + 17 * index, size + 31 * (index % 3)
        ramp = torch.linspace(0, 255, width).expand(height, width)
        noise = torch.rand(height, width, 3, generator=gen) * 64
        pixels = (ramp[..., None] * torch.tensor([1.0, 0.5, 0.2]) + noise).clamp(0, 255).to(torch.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.demo import default_backbone, write_demo_tasks

    with tempfile.TemporaryDirectory() as scratch:
        task_dir = Path(args.task_dir or scratch)
        print("== e2vpt-serve demo ==")
        print(
            "backbone: embedded default ViT-Ti/16 with RANDOM weights (seeded, NOT pretrained): "
            "labels are arbitrary"
        )
        use_one_thread()  # this thread is the client; the server's batcher computes
        backbone = default_backbone()
        paths = write_demo_tasks(backbone, task_dir, args.tasks)
        print(f"wrote {len(paths)} demo task packages to {task_dir}")
        engine = make_engine("torch", backbone)
        return run_demo(engine, task_dir, args.requests, args.threads)


def run_demo(engine: InferenceEngine, task_dir: Path, requests: int, threads: int | None = None) -> int:
    """Start a real server on a free loopback port and exercise it with tritonclient."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import aio as aioclient

    from runtime.serving.server import BackgroundServer, InferenceServer, ServerConfig

    config = ServerConfig(
        host="127.0.0.1", port=0, task_dir=task_dir, max_queue_delay_ms=20, grace_seconds=5, threads=threads
    )
    with BackgroundServer(InferenceServer(engine, config)) as server:
        url = f"127.0.0.1:{server.port}"
        client = grpcclient.InferenceServerClient(url)
        print(f"\nserver on {url}: live={client.is_server_live()} ready={client.is_server_ready()}")
        meta = client.get_server_metadata()
        print(f"server metadata: {meta.name} {meta.version}, extensions {list(meta.extensions)}")
        print("repository index:")
        for model in client.get_model_repository_index().models:
            print(f"  {model.name:<14} version {model.version or '-':<3} {model.state}")
        tasks = [m.name for m in client.get_model_repository_index().models if m.state == "READY"]
        first = client.get_model_metadata(tasks[0])
        inputs = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in first.inputs)
        print(
            f"model metadata of {tasks[0]}: inputs (send one) {inputs}; "
            f"output logits {list(first.outputs[0].shape)}"
        )

        images = demo_images(8)
        size = engine.backbone.spec.img_size
        pixels = np.random.default_rng(0).integers(0, 256, (2, size + 32, size, 3), dtype=np.uint8)

        async def burst() -> list[tuple[str, str, list[bytes]]]:
            async with aioclient.InferenceServerClient(url) as aclient:

                async def one(index: int) -> tuple[str, str, list[bytes]]:
                    task = tasks[index % len(tasks)]
                    if index % 4 == 3:
                        tensor = aioclient.InferInput("pixels", list(pixels.shape), "UINT8")
                        tensor.set_data_from_numpy(pixels)
                        kind = "uint8 pixels x2"
                    else:
                        data = np.array([images[index % len(images)]], dtype=np.object_)
                        tensor = aioclient.InferInput("image", [1], "BYTES")
                        tensor.set_data_from_numpy(data)
                        kind = "PNG image"
                    wanted = aioclient.InferRequestedOutput("logits", class_count=3)
                    result = await aclient.infer(task, [tensor], outputs=[wanted])
                    return task, kind, list(result.as_numpy("logits")[0])

                return await asyncio.gather(*(one(i) for i in range(requests)))

        started = time.perf_counter()
        answers = asyncio.run(burst())
        elapsed = time.perf_counter() - started
        print(f"\n{requests} concurrent requests over {len(tasks)} tasks in {elapsed:.2f} s; top-3 of a few:")
        for task, kind, top in answers[:6]:
            shown = ", ".join(item.decode() for item in top)
            print(f"  {task:<12} {kind:<16} {shown}")
        print("\nmodel statistics (batching across tasks):")
        for stats in client.get_inference_statistics().model_stats:
            sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
            print(
                f"  {stats.name:<12} requests {stats.inference_stats.success.count:>3}  "
                f"images {stats.inference_count:>3}  batches {stats.execution_count:>3}  "
                f"batch sizes seen {dict(sorted(sizes.items()))}"
            )
        client.close()
    print("\nserver shut down cleanly")
    return 0


def _add_log_args(parser: argparse.ArgumentParser, fmt: str, level: str) -> None:
    parser.add_argument("--log-format", choices=("text", "json"), default=fmt, help="log lines")
    parser.add_argument("--log-level", default=level, help="logging level name")


def main(argv: Sequence[str] | None = None) -> int:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__, formatter_class=formatter)
    _add_log_args(parser, "text", "INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", formatter_class=formatter, help="serve tasks over the KServe v2 gRPC API"
    )
    _add_backbone_args(serve)
    add_server_args(serve)
    add_cluster_args(serve)
    serve.set_defaults(run=cmd_serve)

    demo = commands.add_parser(
        "demo",
        formatter_class=formatter,
        help="embedded default backbone + demo tasks, queried with tritonclient",
    )
    demo.add_argument("--task-dir", help="where to write the demo packages (default: a temp dir)")
    demo.add_argument("--tasks", type=int, default=4)
    demo.add_argument("--requests", type=int, default=48)
    demo.add_argument("--threads", type=int)
    demo.set_defaults(run=cmd_demo)

    classify = commands.add_parser(
        "classify", formatter_class=formatter, help="in-process: top-k of images under task packages"
    )
    _add_backbone_args(classify)
    classify.add_argument("--task", action="append", required=True, help="task package file (repeatable)")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("images", nargs="+", help="JPEG/PNG files")
    classify.set_defaults(run=cmd_classify)

    for command in (serve, demo, classify):
        # Also accepted after the command; SUPPRESS keeps the value given before it, if any.
        _add_log_args(command, argparse.SUPPRESS, argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging(args.log_format, "WARNING" if args.command == "demo" else args.log_level)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:  # bad files and settings: say what, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
