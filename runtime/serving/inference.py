"""The server's answers to every protocol call, independent of the transport.

gRPC (``runtime.serving.servicer``) and an HTTP front end are thin adapters over
``InferenceService``: they convert their messages to ``protocol`` types, call it, and map a
``ServingError`` to their status. An inference request is:

1. admitted, or refused with UNAVAILABLE at once (in-flight limit, full queue, full decoding
   backlog) before anything of it is decoded;
2. on a decoding worker (never on the event loop): skipped if its deadline passed or its caller
   left, its task resolved ONCE (``TaskRegistry.hold``), its input validated and preprocessed with
   that version's settings;
3. computed by the batcher with that same entry, answered with that entry's labels and version;
4. released (the hold and the admission) however it ends: answer, error, deadline, cancellation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from runtime.core.files import shown
from runtime.core.package import PackageError, Preprocess
from runtime.core.registry import TaskEntry, TaskRegistry, UnknownTaskError
from runtime.serving.admission import Admission, BoundedPool
from runtime.serving.batcher import Batcher
from runtime.serving.errors import ServingError, Status, as_serving_error, without_paths
from runtime.serving.metrics import ServerMetrics
from runtime.serving.model_info import (
    ModelConfiguration,
    ModelMetadata,
    ModelStatistics,
    QueueSettings,
    ServerMetadata,
    configuration_of,
    metadata_of,
    statistics_of,
)
from runtime.serving.preprocess import check_normalized, encoded_to_input, pixels_to_input
from runtime.serving.protocol import (
    ClientInput,
    EncodedImages,
    InferRequest,
    InferResponse,
    InputLimits,
    OutputRequest,
    Pixels,
    encode_outputs,
    parse_input,
    parse_options,
    parse_outputs,
)
from runtime.serving.task_store import IndexEntry, TaskStore

# Client-chosen names of tasks that are not loaded share one metric label: bounded cardinality.
UNKNOWN_TASK_LABEL = "_unknown"
# gRPC's deadline timer may cancel a call a hair before our monotonic copy of the same instant.
DEADLINE_SLACK_SECONDS = 0.005
# Load parameters tritonclient sends that mean nothing here (tasks have no dependents).
IGNORED_LOAD_PARAMETERS = frozenset({"unload_dependents"})


# Load parameters that pin a task: ``pin`` itself, and tritonclient's ``config`` (a model config JSON).
PIN_PARAMETERS = frozenset({"pin", "config"})


def load_pin(parameters: Mapping[str, object]) -> bool | None:
    """What a load's parameters say of pinning: True, False, or None (nothing said)."""
    pin = parameters.get("pin")
    config = parameters.get("config")
    if config is not None:
        try:
            document = json.loads(config) if isinstance(config, str | bytes) else None
        except ValueError:
            document = None
        parameters_in = document.get("parameters") if isinstance(document, dict) else None
        if (
            set(document or {}) != {"parameters"}
            or not isinstance(parameters_in, dict)
            or set(parameters_in) != {"pin"}
        ):
            raise ServingError(
                Status.INVALID_ARGUMENT,
                "load parameter 'config' is not supported beyond "
                '{"parameters": {"pin": {"string_value": "true"}}}; '
                "place the package in the task directory instead",
            )
        value = parameters_in["pin"]
        pin = value.get("string_value") if isinstance(value, dict) else None
    if pin is None or isinstance(pin, bool):
        return pin
    if isinstance(pin, str) and pin.lower() in ("true", "false"):
        return pin.lower() == "true"
    raise ServingError(
        Status.INVALID_ARGUMENT, f"load parameter 'pin' must be a boolean, got {shown(str(pin))}"
    )


@dataclass(frozen=True)
class _Admitted:
    """A request ready for the batcher: the entry it holds and its model input."""

    entry: TaskEntry
    images: Tensor
    outputs: list[OutputRequest]


class InferenceService:
    """Health, metadata, statistics, repository and inference calls over explicit collaborators.

    Every method raises ``ServingError`` for the client; the async ones never block the loop
    (task store calls run on ``loader`` or the default executor, decoding on ``preprocess``).
    """

    def __init__(
        self,
        *,
        registry: TaskRegistry,
        batcher: Batcher,
        store: TaskStore,
        metrics: ServerMetrics,
        admission: Admission,
        preprocess: BoundedPool,
        loader: Executor,
        ready: threading.Event,
        max_image_pixels: int,
        declared_input: str = "pixels",
        strict_readiness: bool = True,
        expects_tasks: bool = True,
    ) -> None:
        self.registry = registry
        self.batcher = batcher
        self.store = store
        self.metrics = metrics
        self.admission = admission
        self.preprocess = preprocess
        self.loader = loader
        self.ready = ready
        self.limits = InputLimits(batcher.config.max_batch_size, max_image_pixels)
        self.declared_input = declared_input
        self.strict_readiness = strict_readiness
        self.expects_tasks = expects_tasks
        self._hidden_paths = (store.root,)

    # -- health and metadata -----------------------------------------------------------------------

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        """Started and warmed up (and not stopping). Under strict readiness (Triton's default) also
        every task that should be loaded is: no package in the directory failed to load, and a
        repository expected to hold tasks holds some. In-memory state only: safe on the loop."""
        if not self.ready.is_set():
            return False
        if not self.strict_readiness:
            return True
        if self.store.failures(on_demand=False):  # a request's own failed load fails only its requests
            return False
        return self.store.holds_tasks() or not self.expects_tasks

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata()

    def model_ready(self, name: str, version: str = "") -> bool:
        """Resident, or registered and loadable on its first request (then ``version`` is not checked
        before it has loaded once)."""
        try:
            self._entry(name, version)
        except ServingError as error:
            if error.status is not Status.UNAVAILABLE:  # registered, never loaded: servable all the same
                return False
        return self.ready.is_set()  # a loaded task is ready once the engine is warm, whatever its siblings

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        return metadata_of(self._entry(name, version), self.declared_input)

    def model_config(self, name: str, version: str = "") -> ModelConfiguration:
        config = self.batcher.config
        return configuration_of(
            self._entry(name, version),
            self.declared_input,
            QueueSettings(
                config.max_batch_size,
                round(config.max_queue_delay * 1e6),
                config.max_queue_size,
                config.priority_levels,
                config.level(0),
            ),
            self.registry.backbone.device.type,
        )

    def model_statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """One task's statistics, or every loaded task's (sorted by id) when ``name`` is empty."""
        if name:
            entries = [self._entry(name, version)]
        else:
            known = {**self.store.cache.last_entries(), **self.registry.snapshot.tasks}
            entries = sorted(known.values(), key=lambda entry: entry.task_id)
        device_type = self.registry.backbone.device.type
        return [
            statistics_of(entry, self.metrics.task_stats(entry.task_id), device_type) for entry in entries
        ]

    def _entry(self, name: str, version: str) -> TaskEntry:
        """The task's entry for metadata (unheld: never for computing): the resident one, or the one it
        had when last resident if it is registered but evicted."""
        entry = self.registry.snapshot.tasks.get(name)
        if entry is None and self.store.servable(name):
            entry = self.store.cache.last_entry(name)
            if entry is None:
                raise ServingError(
                    Status.UNAVAILABLE,
                    f"task {shown(name)} is registered but has not loaded yet: its metadata is known once "
                    "it loads (on its first request, or load it)",
                )
        if entry is None:
            raise ServingError(Status.NOT_FOUND, f"unknown task {shown(name)}: no loaded task has this id")
        self._check_version(entry, version)
        return entry

    @staticmethod
    def _check_version(entry: TaskEntry, version: str) -> None:
        if version and version != str(entry.version):
            raise ServingError(
                Status.NOT_FOUND,
                f"task {shown(entry.task_id)} version {shown(version)} is not loaded "
                f"(loaded version: {entry.version})",
            )

    # -- repository --------------------------------------------------------------------------------

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        # The default executor, not the loader: the index answers while a slow load runs.
        return await asyncio.get_running_loop().run_in_executor(None, self.store.index, ready_only)

    async def load(
        self, name: str, repository: str = "", parameters: Mapping[str, object] = MappingProxyType({})
    ) -> None:
        """Load or replace task ``name`` from the task directory (explicit mode only).

        Parameter ``pin`` (a boolean, or ``"true"``/``"false"``), or tritonclient's ``config`` holding
        ``{"parameters": {"pin": {"string_value": "true"}}}``, pins the task in the tables (or unpins it).
        """
        pin = load_pin(parameters)
        self._check_control(repository, [key for key in parameters if key not in PIN_PARAMETERS])
        try:
            await asyncio.get_running_loop().run_in_executor(self.loader, self.store.load, name, pin)
        except PackageError as error:
            message = without_paths(f"failed to load {shown(name)}: {error}", self._hidden_paths)
            raise ServingError(Status.INVALID_ARGUMENT, message) from None
        except Exception as error:
            raise as_serving_error(error, self._hidden_paths) from None

    async def unload(
        self, name: str, repository: str = "", parameters: Mapping[str, object] = MappingProxyType({})
    ) -> None:
        """Unload task ``name``; requests already admitted still finish on its version."""
        self._check_control(repository, parameters)
        try:
            await asyncio.get_running_loop().run_in_executor(self.loader, self.store.unload, name)
        except UnknownTaskError:
            raise ServingError(Status.NOT_FOUND, f"cannot unload: unknown task {shown(name)}") from None
        except Exception as error:
            raise as_serving_error(error, self._hidden_paths) from None

    def _check_control(self, repository: str, parameters: Collection[str]) -> None:
        try:
            self.store.check_control_allowed()
        except Exception as error:
            raise as_serving_error(error) from None
        if repository:
            raise ServingError(
                Status.INVALID_ARGUMENT, "named repositories are not supported; leave it empty"
            )
        unsupported = sorted(set(parameters) - IGNORED_LOAD_PARAMETERS)
        if unsupported:
            raise ServingError(
                Status.INVALID_ARGUMENT,
                f"load/unload parameters {[shown(p) for p in unsupported[:4]]} are not supported; "
                "place the package in the task directory instead",
            )

    # -- inference ---------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Answer one inference request; ``deadline`` is a ``time.monotonic()`` instant or None."""
        started = time.perf_counter()
        label, version = self._labels(request.model_name)
        try:
            with self.admission.admitted(), self.metrics.inflight.track_inprogress():
                if self.batcher.full:
                    raise ServingError(
                        Status.UNAVAILABLE,
                        f"queue is full ({self.batcher.config.max_queue_size} requests waiting); retry later",
                    )
                options = parse_options(request.parameters, self.batcher.config.priority_levels)
                if options.timeout_us:  # Triton's queue timeout: whichever of the two comes first
                    timeout = time.monotonic() + options.timeout_us / 1e6
                    deadline = timeout if deadline is None else min(deadline, timeout)
                admitted = await self._admit(request, deadline)
                entry = admitted.entry
                label, version = entry.task_id, str(entry.version)
                try:
                    result = await self.batcher.infer(entry, admitted.images, deadline, options.priority)
                finally:
                    self.registry.release(entry)
            outputs = encode_outputs(result.logits, admitted.outputs, entry.info.labels)
        except asyncio.CancelledError:
            status = Status.DEADLINE_EXCEEDED if _expired(deadline) else Status.CANCELLED
            self.metrics.record_failure(label, version, status.name, time.perf_counter() - started)
            raise
        except Exception as error:
            failure = as_serving_error(error, self._hidden_paths)
            self.metrics.record_failure(label, version, failure.status.name, time.perf_counter() - started)
            raise failure from None
        self.metrics.record_success(entry.task_id, str(entry.version), time.perf_counter() - started)
        return InferResponse(entry.task_id, str(entry.version), request.id, outputs)

    def reject(self, model_name: str, error: BaseException) -> ServingError:
        """Count a request its transport could not even decode; the error to answer it with."""
        failure = as_serving_error(error, self._hidden_paths)
        self.metrics.record_failure(*self._labels(model_name), failure.status.name, 0.0)
        return failure

    def _labels(self, name: str) -> tuple[str, str | None]:
        """Metric labels of a request for ``name`` before it holds a task: the resident version's, the
        name alone for a registered task, else the shared unknown-task label and no version (no
        Triton series for it)."""
        entry = self.registry.snapshot.tasks.get(name)
        if entry is not None:
            return name, str(entry.version)
        return (name, None) if self.store.servable(name) else (UNKNOWN_TASK_LABEL, None)

    async def _admit(self, request: InferRequest, deadline: float | None) -> _Admitted:
        """Make the task resident if it is not, then hold it and decode the input on a decoding worker.

        The task is wanted from here on (then held until the answer), so no load evicts it meanwhile."""
        with self.store.cache.wanted(request.model_name):
            await self._resident(request.model_name)
            return await self._decode(request, deadline)

    async def _resident(self, name: str) -> None:
        """Wait, without blocking the loop, for a registered task's load (shared by its waiters)."""
        if name in self.registry or not self.store.servable(name):
            return
        started = time.perf_counter()
        try:
            await asyncio.shield(asyncio.wrap_future(self.store.fetch(name)))
        except PackageError as error:
            message = without_paths(f"task {shown(name)} could not be loaded: {error}", self._hidden_paths)
            raise ServingError(Status.UNAVAILABLE, message) from None
        except Exception as error:
            raise as_serving_error(error, self._hidden_paths) from None
        finally:
            self.metrics.load_wait_seconds.observe(time.perf_counter() - started)

    async def _decode(self, request: InferRequest, deadline: float | None) -> _Admitted:
        """Hold the task and decode the input on a decoding worker."""
        abandoned = threading.Event()
        job = self.preprocess.submit(self._prepare, request, deadline, abandoned)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            abandoned.set()
            if job.cancel():  # never started: nothing decoded, nothing held
                self._count_dropped(deadline)
            else:
                job.add_done_callback(self._release_abandoned)
            raise

    def _prepare(
        self, request: InferRequest, deadline: float | None, abandoned: threading.Event
    ) -> _Admitted:
        """On a decoding worker: skip a request nobody waits for, else hold its task and decode."""
        if abandoned.is_set() or _expired(deadline):
            expired = self._count_dropped(deadline)
            if expired:
                raise ServingError(Status.DEADLINE_EXCEEDED, "deadline passed before the input was decoded")
            raise ServingError(Status.CANCELLED, "the request was cancelled before its input was decoded")
        entry = self._hold(request.model_name, request.model_version)
        try:
            started = time.perf_counter()
            outputs = parse_outputs(request.outputs, entry.task_id)
            pre = entry.info.preprocess
            images = self._model_input(parse_input(request, pre.input_size, self.limits), pre)
            self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
            return _Admitted(entry, images, outputs)
        except BaseException:
            self.registry.release(entry)
            raise

    def _hold(self, name: str, version: str) -> TaskEntry:
        try:
            entry = self.store.cache.hold(name)
        except UnknownTaskError:
            raise ServingError(
                Status.NOT_FOUND, f"unknown task {shown(name)}: no loaded task has this id"
            ) from None
        try:
            self._check_version(entry, version)
        except ServingError:
            self.registry.release(entry)
            raise
        return entry

    def _model_input(self, client_input: ClientInput, pre: Preprocess) -> Tensor:
        if isinstance(client_input, EncodedImages):
            return encoded_to_input(client_input.items, pre, self.limits.max_image_pixels)
        if isinstance(client_input, Pixels):
            return pixels_to_input(torch.from_numpy(client_input.array), pre, self.limits.max_image_pixels)
        return check_normalized(torch.from_numpy(client_input.array), pre.input_size)

    def _release_abandoned(self, job: Future[_Admitted]) -> None:
        """A decoded request whose caller left: give its hold back."""
        if not job.cancelled() and job.exception() is None:
            self.registry.release(job.result().entry)

    def _count_dropped(self, deadline: float | None) -> bool:
        """Count a request dropped before decoding; True if it was its deadline (else a cancel)."""
        expired = _expired(deadline)
        self.metrics.dropped.labels("deadline" if expired else "cancelled").inc()
        return expired


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_SECONDS
