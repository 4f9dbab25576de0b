"""Which tasks are loaded, in which slots: immutable snapshots over slot tables.

Loading a task writes its compiled prefix and its head into a free slot of preallocated tables
and publishes a new snapshot; a forward holds one snapshot for its whole batch, so tasks can be
added, replaced and removed while forwards run. A slot is reused only after every snapshot that
could still reference it has been released.

The tables' tensors never move within one allocation (:class:`SlotTables`): a CUDA graph captured
against them replays any mix of loaded tasks. When a load needs more slots, a longer prefix or a
wider head, the registry allocates bigger tables and calls the ``on_new_tables`` listeners on the
loading thread *before* any snapshot uses them, so an engine can re-capture off the request path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from runtime.core.backbone import Backbone, BackboneSpec
from runtime.core.compile import CompiledTask, compile_task
from runtime.core.package import Preprocess, TaskPackage, check_task_id


class UnknownTaskError(KeyError):
    """A task id that no loaded task has."""

    def __str__(self) -> str:
        return f"unknown task {self.args[0]!r}"


@dataclass(frozen=True)
class TaskInfo:
    """What a loaded task keeps of its package once compiled: everything but the prompt tensors."""

    labels: list[str] | None
    preprocess: Preprocess
    backbone_spec: BackboneSpec
    backbone_fingerprint: str
    metadata: Mapping[str, Any]

    @classmethod
    def of(cls, package: TaskPackage) -> TaskInfo:
        return cls(
            labels=package.labels,
            preprocess=package.preprocess,
            backbone_spec=package.backbone_spec,
            backbone_fingerprint=package.backbone_fingerprint,
            metadata=MappingProxyType(package.metadata()),
        )


@dataclass(frozen=True)
class TaskEntry:
    """One loaded version of a task; its head (fp32) is a view of its rows in the slot tables."""

    task_id: str
    version: int
    slot: int
    info: TaskInfo
    prefix_len: int
    head_weight: Tensor
    head_bias: Tensor
    loaded_at: float
    load_seconds: float

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes this task holds: its prefix rows in the tables plus its head."""
        spec = self.info.backbone_spec
        prefix = 2 * spec.depth * spec.embed_dim * self.prefix_len * self.head_weight.element_size()
        return prefix + (self.head_weight.numel() + self.head_bias.numel()) * self.head_weight.element_size()


@dataclass(frozen=True)
class SlotTables:
    """One allocation of the slot tables: what every loaded task is, as rows indexed by slot.

    ``prefix_k``/``prefix_v [L, slots, H, P, d]`` (backbone dtype), ``prefix_bias [slots, P]`` and
    ``prefix_len [slots]`` (int32) are the attention contract's tables (:mod:`kernels.reference`);
    ``head_weight [slots, C, D]`` and ``head_bias [slots, C]`` (fp32, zero past each task's classes)
    and ``head_classes [slots]`` (int64, host) hold each task's head padded to the widest (C): the
    layout of :class:`runtime.engines.heads.HeadTable`. ``allocation`` counts reallocations: the
    tensors of one allocation are written in place (free slots only) and never replaced.
    """

    allocation: int
    prefix_k: Tensor
    prefix_v: Tensor
    prefix_bias: Tensor
    prefix_len: Tensor
    head_weight: Tensor
    head_bias: Tensor
    head_classes: Tensor

    @property
    def slots(self) -> int:
        return self.prefix_bias.shape[0]

    @property
    def prefix(self) -> int:
        return self.prefix_bias.shape[1]

    @property
    def classes(self) -> int:
        return self.head_bias.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))

    @classmethod
    def allocate(
        cls, backbone: Backbone, slots: int, prefix: int, classes: int, allocation: int = 0
    ) -> SlotTables:
        spec, device, dtype = backbone.spec, backbone.device, backbone.dtype
        shape = (spec.depth, slots, spec.num_heads, prefix, spec.head_dim)
        return cls(
            allocation=allocation,
            prefix_k=torch.zeros(shape, dtype=dtype, device=device),
            prefix_v=torch.zeros(shape, dtype=dtype, device=device),
            prefix_bias=torch.zeros(slots, prefix, dtype=torch.float32, device=device),
            prefix_len=torch.zeros(slots, dtype=torch.int32, device=device),
            head_weight=torch.zeros(slots, classes, spec.embed_dim, dtype=torch.float32, device=device),
            head_bias=torch.zeros(slots, classes, dtype=torch.float32, device=device),
            head_classes=torch.zeros(slots, dtype=torch.int64),
        )

    def grown(self, backbone: Backbone, slots: int, prefix: int, classes: int) -> SlotTables:
        """The next allocation, at least this big, holding a copy of these (live snapshots keep these)."""
        bigger = SlotTables.allocate(
            backbone,
            max(slots, self.slots),
            max(prefix, self.prefix),
            max(classes, self.classes),
            self.allocation + 1,
        )
        old_slots, old_prefix, old_classes = self.slots, self.prefix, self.classes
        bigger.prefix_k[:, :old_slots, :, :old_prefix] = self.prefix_k
        bigger.prefix_v[:, :old_slots, :, :old_prefix] = self.prefix_v
        bigger.prefix_bias[:old_slots, :old_prefix] = self.prefix_bias
        bigger.prefix_len[:old_slots] = self.prefix_len
        bigger.head_weight[:old_slots, :old_classes] = self.head_weight
        bigger.head_bias[:old_slots, :old_classes] = self.head_bias
        bigger.head_classes[:old_slots] = self.head_classes
        return bigger

    def write(self, slot: int, task: CompiledTask, head_weight: Tensor, head_bias: Tensor) -> None:
        length, classes = task.prefix_len, head_weight.shape[0]
        self.prefix_k[:, slot, :, :length] = task.keys.to(self.prefix_k.dtype)
        self.prefix_v[:, slot, :, :length] = task.values.to(self.prefix_v.dtype)
        self.prefix_k[:, slot, :, length:] = 0
        self.prefix_v[:, slot, :, length:] = 0
        self.prefix_bias[slot] = 0
        self.prefix_bias[slot, :length] = task.bias
        self.prefix_len[slot] = length
        self.head_weight[slot] = 0
        self.head_weight[slot, :classes] = head_weight
        self.head_bias[slot] = 0
        self.head_bias[slot, :classes] = head_bias
        self.head_classes[slot] = classes

    def head(self, slot: int, classes: int) -> tuple[Tensor, Tensor]:
        """The head of the task in ``slot``: views of its rows, not copies."""
        return self.head_weight[slot, :classes], self.head_bias[slot, :classes]


@dataclass(frozen=True)
class Snapshot:
    """Loaded tasks at one instant: the slot tables and the task-to-slot map. Never mutated.

    Slots of no task in ``tasks`` hold stale data and are read only by requests that hold them.
    ``longest_prefix`` is the longest prefix of any loaded task: every batch attends over that
    many prefix slots, so a row's output never depends on which rows share its batch.
    """

    generation: int
    tables: SlotTables
    tasks: Mapping[str, TaskEntry]
    longest_prefix: int

    @property
    def prefix_k(self) -> Tensor:
        return self.tables.prefix_k

    @property
    def prefix_v(self) -> Tensor:
        return self.tables.prefix_v

    @property
    def prefix_bias(self) -> Tensor:
        return self.tables.prefix_bias

    @property
    def prefix_len(self) -> Tensor:
        return self.tables.prefix_len

    def entries(self, task_ids: Sequence[str]) -> list[TaskEntry]:
        try:
            return [self.tasks[task_id] for task_id in task_ids]
        except KeyError as error:
            raise UnknownTaskError(error.args[0]) from None


@dataclass
class _Leases:
    """What still reads the tables, to know when a freed slot is safe to reuse.

    ``active``: snapshots in use, by generation. ``held``: entries held by requests, by slot.
    """

    active: dict[int, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    freed: list[tuple[int, int]] = field(default_factory=list)  # (generation it was freed at, slot)

    def oldest(self) -> int | None:
        return min(self.active) if self.active else None

    def reusable(self) -> list[int]:
        oldest = self.oldest()
        ready = [
            slot for gen, slot in self.freed if (oldest is None or oldest >= gen) and slot not in self.held
        ]
        self.freed = [(gen, slot) for gen, slot in self.freed if slot not in ready]
        return ready


def _moved(entry: TaskEntry, tables: SlotTables) -> TaskEntry:
    """``entry`` with its head read from ``tables`` (a new allocation holding the same rows)."""
    weight, bias = tables.head(entry.slot, entry.num_classes)
    return replace(entry, head_weight=weight, head_bias=bias)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# Growth steps of the tables: a few longer prefixes or wider heads cost one reallocation, not one each.
PREFIX_STEP = 8
CLASSES_STEP = 16
TablesListener = Callable[[SlotTables], None]


class TaskRegistry:
    """Thread-safe set of loaded tasks for one backbone.

    Loads and unloads are serialized; forwards (``acquire``), ``hold`` and ``release`` never wait
    for a load's compile or a reallocation, only for the short publish.
    """

    def __init__(
        self, backbone: Backbone, initial_slots: int = 8, initial_prefix: int = 16, initial_classes: int = 16
    ) -> None:
        self.backbone = backbone
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._tables = SlotTables.allocate(backbone, initial_slots, initial_prefix, initial_classes)
        self._free = list(range(initial_slots))
        self._leases = _Leases()
        self._versions: dict[str, int] = {}
        self._listeners: list[TablesListener] = []
        self._snapshot = self._publish({}, generation=0)

    def on_new_tables(self, listener: TablesListener) -> None:
        """Call ``listener(tables)`` on the loading thread whenever the tables are reallocated.

        It runs before any snapshot uses the new tables (they already hold every loaded task); an
        engine re-captures its CUDA graphs there, off the request path. If it raises, the load
        fails and the registry keeps its tables.
        """
        with self._writing:
            self._listeners.append(listener)

    @property
    def tables(self) -> SlotTables:
        """The current allocation of the slot tables."""
        return self._tables

    def _publish(self, tasks: dict[str, TaskEntry], generation: int) -> Snapshot:
        self._snapshot = Snapshot(
            generation=generation,
            tables=self._tables,
            tasks=MappingProxyType(tasks),
            longest_prefix=max((entry.prefix_len for entry in tasks.values()), default=0),
        )
        return self._snapshot

    def add(self, package: TaskPackage) -> TaskEntry:
        """Load a task, or replace the loaded version of the same id. Returns the new entry."""
        started = time.perf_counter()
        compiled = compile_task(package, self.backbone)
        info = TaskInfo.of(package)
        device = self.backbone.device
        head_weight = package.head_weight.to(device=device, dtype=torch.float32)
        head_bias = package.head_bias.to(device=device, dtype=torch.float32)
        with self._writing:
            with self._lock:
                self._free.extend(self._leases.reusable())
                tables, full = self._tables, not self._free
            grown = None
            if full or compiled.prefix_len > tables.prefix or package.num_classes > tables.classes:
                grown = tables.grown(
                    self.backbone,
                    tables.slots * 2 if full else tables.slots,
                    _round_up(compiled.prefix_len, PREFIX_STEP),
                    _round_up(package.num_classes, CLASSES_STEP),
                )
                for listener in self._listeners:  # outside the lock: forwards go on meanwhile
                    listener(grown)
            with self._lock:
                tasks = dict(self._snapshot.tasks)
                if grown is not None:
                    self._free.extend(range(tables.slots, grown.slots))
                    self._tables = grown
                    # Loaded tasks' heads now read from the new tables (held entries keep the old ones).
                    tasks = {key: _moved(entry, grown) for key, entry in tasks.items()}
                slot = min(self._free)  # lowest first keeps the tables dense
                self._free.remove(slot)
                self._tables.write(slot, compiled, head_weight, head_bias)
                version = self._versions.get(package.task_id, 0) + 1
                self._versions[package.task_id] = version
                weight_view, bias_view = self._tables.head(slot, package.num_classes)
                entry = TaskEntry(
                    task_id=package.task_id,
                    version=version,
                    slot=slot,
                    info=info,
                    prefix_len=compiled.prefix_len,
                    head_weight=weight_view,
                    head_bias=bias_view,
                    loaded_at=time.time(),
                    load_seconds=time.perf_counter() - started,
                )
                previous = tasks.get(package.task_id)
                tasks[package.task_id] = entry
                generation = self._snapshot.generation + 1
                if previous is not None:
                    self._leases.freed.append((generation, previous.slot))
                self._publish(tasks, generation)
        return entry

    def remove(self, task_id: str) -> TaskEntry:
        """Unload a task; forwards already holding a snapshot still finish with it."""
        with self._writing, self._lock:
            tasks = dict(self._snapshot.tasks)
            if task_id not in tasks:
                raise UnknownTaskError(task_id)
            entry = tasks.pop(task_id)
            generation = self._snapshot.generation + 1
            self._leases.freed.append((generation, entry.slot))
            self._publish(tasks, generation)
        return entry

    @contextmanager
    def acquire(self) -> Iterator[Snapshot]:
        """The current snapshot, held until the block exits (its slots stay untouched meanwhile)."""
        with self._lock:
            snapshot = self._snapshot
            self._leases.active[snapshot.generation] = self._leases.active.get(snapshot.generation, 0) + 1
        try:
            yield snapshot
        finally:
            with self._lock:
                count = self._leases.active[snapshot.generation] - 1
                if count:
                    self._leases.active[snapshot.generation] = count
                else:
                    del self._leases.active[snapshot.generation]

    def hold(self, task_id: str) -> TaskEntry:
        """Resolve ``task_id`` once, for one request: its entry stays computable until ``release``.

        The entry's slot is not reused while held, so a request answers with the version it was
        admitted under even if the task is replaced or unloaded while it waits.
        """
        with self._lock:
            try:
                entry = self._snapshot.tasks[task_id]
            except KeyError:
                raise UnknownTaskError(task_id) from None
            self._leases.held[entry.slot] = self._leases.held.get(entry.slot, 0) + 1
        return entry

    def release(self, entry: TaskEntry) -> None:
        """Drop one ``hold`` of ``entry``."""
        with self._lock:
            count = self._leases.held[entry.slot] - 1
            if count:
                self._leases.held[entry.slot] = count
            else:
                del self._leases.held[entry.slot]

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot, unleased: for metadata only, not for running a forward."""
        return self._snapshot

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._snapshot.tasks

    def __len__(self) -> int:
        return len(self._snapshot.tasks)

    def get(self, task_id: str) -> TaskEntry:
        check_task_id(task_id)
        try:
            return self._snapshot.tasks[task_id]
        except KeyError:
            raise UnknownTaskError(task_id) from None

    def memory(self) -> dict[str, int]:
        """Bytes per loaded task, plus the tables' allocated total (padding and free slots included)."""
        snapshot = self._snapshot
        report = {task_id: entry.nbytes for task_id, entry in snapshot.tasks.items()}
        report["__tables_allocated__"] = snapshot.tables.nbytes
        return report
