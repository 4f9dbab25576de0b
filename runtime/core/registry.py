"""Which tasks are resident, in which slots: immutable snapshots over paged slot tables.

Loading a task writes its compiled prefix and its head into free rows of preallocated pools, names
those rows in a free slot of the tables, and publishes a new snapshot; a forward holds one snapshot
for its whole batch, so tasks can be added, replaced and removed while forwards run. A slot and its
rows are reused only after every snapshot and every request that could still read them is done.

Pools are paged with one row per page (vLLM's block table with blocks of one row): a task takes
exactly its own prefix rows and class rows, whatever the lengths of the others, so the tables hold
no padding and never fragment.

The tables' tensors never move within one allocation (:class:`SlotTables`): a CUDA graph captured
against them replays any mix of loaded tasks. When a load needs more slots, a longer prefix or a
wider head, the registry allocates bigger tables and calls the ``on_new_tables`` listeners on the
loading thread *before* any snapshot uses them, so an engine can re-capture off the request path.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def compiled_nbytes(spec: BackboneSpec, dtype: torch.dtype, prefix_len: int, num_classes: int) -> int:
    """A task's exact compiled size: a key and a value row per prefix row and layer (backbone dtype),
    a bias per prefix row, and its head (fp32). What the tables hold of it, without any padding."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    prefix = 2 * spec.depth * spec.embed_dim * prefix_len * itemsize + 4 * prefix_len
    return prefix + 4 * num_classes * (spec.embed_dim + 1)


@dataclass(frozen=True)
class PreparedTask:
    """A task compiled for one backbone and ready to write into the tables (or to keep on the host:
    writing it again needs no package read and no compile)."""

    task_id: str
    info: TaskInfo
    compiled: CompiledTask
    head_weight: Tensor  # [C, D] fp32
    head_bias: Tensor  # [C] fp32

    @classmethod
    def of(cls, package: TaskPackage, backbone: Backbone) -> PreparedTask:
        compiled = compile_task(package, backbone)
        return cls(
            task_id=package.task_id,
            info=TaskInfo.of(package),
            compiled=compiled,
            head_weight=package.head_weight.to(device=backbone.device, dtype=torch.float32),
            head_bias=package.head_bias.to(device=backbone.device, dtype=torch.float32),
        )

    @property
    def prefix_len(self) -> int:
        return self.compiled.prefix_len

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors as they are held here (compiled prefix in fp32, head in fp32)."""
        tensors = (
            self.compiled.keys,
            self.compiled.values,
            self.compiled.bias,
            self.head_weight,
            self.head_bias,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> PreparedTask:
        """A copy whose tensors live on ``device`` (the host tier keeps tasks on the CPU)."""
        compiled = CompiledTask(
            keys=self.compiled.keys.to(device),
            values=self.compiled.values.to(device),
            bias=self.compiled.bias.to(device),
        )
        return replace(
            self,
            compiled=compiled,
            head_weight=self.head_weight.to(device),
            head_bias=self.head_bias.to(device),
        )


@dataclass(frozen=True)
class TaskEntry:
    """One resident version of a task: its slot in the tables (its rows are named there)."""

    task_id: str
    version: int
    slot: int
    info: TaskInfo
    prefix_len: int
    num_classes: int
    nbytes: int  # its exact compiled size (:func:`compiled_nbytes`): the pool rows it holds
    loaded_at: float
    load_seconds: float


@dataclass(frozen=True)
class SlotTables:
    """One allocation of the tables: pools of rows shared by every task, and per-slot page tables.

    Attention contract (:mod:`kernels.reference`), per layer ``l``: ``prefix_k[l]``/``prefix_v[l]``
    ``[H, R, d]`` (backbone dtype) are the pools of prefix rows, ``prefix_bias [R]`` fp32 the logit bias
    of each row, ``prefix_table [slots, P]`` int32 the pool row of each slot's prefix position and
    ``prefix_len [slots]`` int32. Heads (:class:`runtime.engines.heads.HeadTable`): ``head_weight
    [Rc, D]`` and ``head_bias [Rc]`` fp32 pools of class rows, ``head_table [slots, C]`` int32 and
    ``head_classes [slots]`` (int64, host). ``P`` and ``C`` are the widest prefix and head the tables
    can name; positions past a slot's own length name row 0 and are never read as its own.
    ``allocation`` counts reallocations: one allocation is written in place (free rows and slots only)
    and never replaced, and a row keeps its index across reallocations.
    """

    allocation: int
    prefix_k: Tensor
    prefix_v: Tensor
    prefix_bias: Tensor
    prefix_table: Tensor
    prefix_len: Tensor
    head_weight: Tensor
    head_bias: Tensor
    head_table: Tensor
    head_classes: Tensor

    @property
    def slots(self) -> int:
        return self.prefix_table.shape[0]

    @property
    def prefix(self) -> int:
        return self.prefix_table.shape[1]

    @property
    def classes(self) -> int:
        return self.head_table.shape[1]

    @property
    def prefix_rows(self) -> int:
        return self.prefix_bias.shape[0]

    @property
    def class_rows(self) -> int:
        return self.head_bias.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))

    @classmethod
    def allocate(cls, backbone: Backbone, size: TablesSize, allocation: int = 0) -> SlotTables:
        spec, device, dtype = backbone.spec, backbone.device, backbone.dtype
        pool = (spec.depth, spec.num_heads, size.prefix_rows, spec.head_dim)
        return cls(
            allocation=allocation,
            prefix_k=torch.zeros(pool, dtype=dtype, device=device),
            prefix_v=torch.zeros(pool, dtype=dtype, device=device),
            prefix_bias=torch.zeros(size.prefix_rows, dtype=torch.float32, device=device),
            prefix_table=torch.zeros(size.slots, size.prefix, dtype=torch.int32, device=device),
            prefix_len=torch.zeros(size.slots, dtype=torch.int32, device=device),
            head_weight=torch.zeros(size.class_rows, spec.embed_dim, dtype=torch.float32, device=device),
            head_bias=torch.zeros(size.class_rows, dtype=torch.float32, device=device),
            head_table=torch.zeros(size.slots, size.classes, dtype=torch.int32, device=device),
            head_classes=torch.zeros(size.slots, dtype=torch.int64),
        )

    @property
    def size(self) -> TablesSize:
        return TablesSize(self.slots, self.prefix, self.classes, self.prefix_rows, self.class_rows)

    def grown(self, backbone: Backbone, size: TablesSize) -> SlotTables:
        """The next allocation, at least this big, holding a copy of these (live snapshots keep these)."""
        bigger = SlotTables.allocate(backbone, size.at_least(self.size), self.allocation + 1)
        slots, prefix, classes = self.slots, self.prefix, self.classes
        bigger.prefix_k[:, :, : self.prefix_rows] = self.prefix_k
        bigger.prefix_v[:, :, : self.prefix_rows] = self.prefix_v
        bigger.prefix_bias[: self.prefix_rows] = self.prefix_bias
        bigger.prefix_table[:slots, :prefix] = self.prefix_table
        bigger.prefix_len[:slots] = self.prefix_len
        bigger.head_weight[: self.class_rows] = self.head_weight
        bigger.head_bias[: self.class_rows] = self.head_bias
        bigger.head_table[:slots, :classes] = self.head_table
        bigger.head_classes[:slots] = self.head_classes
        return bigger

    def write(self, slot: int, rows: SlotRows, task: PreparedTask) -> None:
        """Write ``task`` into its rows and name them in ``slot``'s page tables."""
        device = self.prefix_k.device
        prefix_rows = torch.tensor(rows.prefix, dtype=torch.int64, device=device)
        class_rows = torch.tensor(rows.classes, dtype=torch.int64, device=device)
        compiled = task.compiled
        self.prefix_k.index_copy_(2, prefix_rows, compiled.keys.to(device=device, dtype=self.prefix_k.dtype))
        self.prefix_v.index_copy_(
            2, prefix_rows, compiled.values.to(device=device, dtype=self.prefix_v.dtype)
        )
        self.prefix_bias.index_copy_(0, prefix_rows, compiled.bias.to(device=device, dtype=torch.float32))
        self.prefix_table[slot] = 0
        self.prefix_table[slot, : len(rows.prefix)] = prefix_rows.to(torch.int32)
        self.prefix_len[slot] = len(rows.prefix)
        self.head_weight.index_copy_(0, class_rows, task.head_weight.to(device))
        self.head_bias.index_copy_(0, class_rows, task.head_bias.to(device))
        self.head_table[slot] = 0
        self.head_table[slot, : len(rows.classes)] = class_rows.to(torch.int32)
        self.head_classes[slot] = len(rows.classes)

    def head(self, slot: int) -> tuple[Tensor, Tensor]:
        """The head of the task in ``slot``: weight ``[C, D]`` and bias ``[C]`` (copies of its rows)."""
        rows = self.head_table[slot, : int(self.head_classes[slot])].long()
        return self.head_weight.index_select(0, rows), self.head_bias.index_select(0, rows)


@dataclass(frozen=True)
class TablesSize:
    """Sizes of one allocation: slots, widest prefix and head named, rows in the two pools."""

    slots: int
    prefix: int
    classes: int
    prefix_rows: int
    class_rows: int

    def at_least(self, other: TablesSize) -> TablesSize:
        return TablesSize(
            *(max(a, b) for a, b in zip(vars(self).values(), vars(other).values(), strict=True))
        )


@dataclass(frozen=True)
class SlotRows:
    """The pool rows one slot holds: its prefix rows and its class rows, in order."""

    prefix: list[int]
    classes: list[int]


@dataclass(frozen=True)
class Snapshot:
    """Resident tasks at one instant: the tables and the task-to-slot map. Never mutated.

    Slots of no task in ``tasks`` hold stale rows, read only by requests that hold them.
    ``longest_prefix`` is the longest prefix of any resident task: every batch attends over that
    many prefix positions, so a row's output never depends on which rows share its batch.
    """

    generation: int
    tables: SlotTables
    tasks: Mapping[str, TaskEntry]
    longest_prefix: int

    def entries(self, task_ids: Sequence[str]) -> list[TaskEntry]:
        try:
            return [self.tasks[task_id] for task_id in task_ids]
        except KeyError as error:
            raise UnknownTaskError(error.args[0]) from None


@dataclass
class _Leases:
    """What still reads the tables, to know when a freed slot (and its rows) is safe to reuse.

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


class _RowPool:
    """Free row indices of one pool, lowest first (a dense pool copies less when it grows)."""

    def __init__(self, rows: int) -> None:
        self._free = list(range(rows))

    def __len__(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        return [heapq.heappop(self._free) for _ in range(count)]

    def give(self, rows: Iterable[int]) -> None:
        for row in rows:
            heapq.heappush(self._free, row)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pool_rows(current: int, free: int, needed: int) -> int:
    """Rows of a pool that must grow to take ``needed`` more rows with ``free`` free."""
    if needed <= free:
        return current
    return max(current + needed - free, math.ceil(current * POOL_GROWTH))


# Growth steps: a few longer prefixes or wider heads cost one reallocation, not one each; a pool grows
# by a quarter at least, so its free rows stay a small share of it.
PREFIX_STEP = 8
CLASSES_STEP = 16
POOL_GROWTH = 1.25
TablesListener = Callable[[SlotTables], None]


class TaskRegistry:
    """Thread-safe set of resident tasks for one backbone.

    Loads and unloads are serialized; forwards (``acquire``), ``hold`` and ``release`` never wait
    for a load's compile or a reallocation, only for the short publish.
    """

    def __init__(
        self,
        backbone: Backbone,
        initial_slots: int = 8,
        initial_prefix: int = 16,
        initial_classes: int = 16,
    ) -> None:
        self.backbone = backbone
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        size = TablesSize(
            initial_slots,
            initial_prefix,
            initial_classes,
            initial_slots * initial_prefix,
            initial_slots * initial_classes,
        )
        self._tables = SlotTables.allocate(backbone, size)
        self._free = list(range(initial_slots))
        self._prefix_rows = _RowPool(size.prefix_rows)
        self._class_rows = _RowPool(size.class_rows)
        self._rows: dict[int, SlotRows] = {}
        self._leases = _Leases()
        self._versions: dict[str, int] = {}
        self._listeners: list[TablesListener] = []
        self._snapshot = self._publish({}, generation=0)

    def on_new_tables(self, listener: TablesListener) -> None:
        """Call ``listener(tables)`` on the loading thread whenever the tables are reallocated.

        It runs before any snapshot uses the new tables (they already hold every resident task); an
        engine re-captures its CUDA graphs there, off the request path. If it raises, the load
        fails and the registry keeps its tables.
        """
        with self._writing:
            self._listeners.append(listener)

    @property
    def tables(self) -> SlotTables:
        """The current allocation of the tables."""
        return self._tables

    def _publish(self, tasks: dict[str, TaskEntry], generation: int) -> Snapshot:
        self._snapshot = Snapshot(
            generation=generation,
            tables=self._tables,
            tasks=MappingProxyType(tasks),
            longest_prefix=max((entry.prefix_len for entry in tasks.values()), default=0),
        )
        return self._snapshot

    def _reclaim(self) -> None:
        """Slots (and their rows) that nothing can read any more become free. Under ``_lock``."""
        for slot in self._leases.reusable():
            rows = self._rows.pop(slot)
            self._prefix_rows.give(rows.prefix)
            self._class_rows.give(rows.classes)
            self._free.append(slot)

    def add(self, package: TaskPackage) -> TaskEntry:
        """Compile and load a task, or replace the resident version of the same id."""
        started = time.perf_counter()
        return self.insert(PreparedTask.of(package, self.backbone), started=started)

    def insert(self, task: PreparedTask, new_version: bool = True, started: float | None = None) -> TaskEntry:
        """Write a compiled task into the tables (replacing its resident version). Returns its entry.

        ``new_version=False``: the same package made resident again (after an eviction) keeps the
        version it had. ``started``: the ``perf_counter`` instant its load began (the entry's
        ``load_seconds`` counts from there; default: now)."""
        started = time.perf_counter() if started is None else started
        with self._writing:
            with self._lock:
                self._reclaim()
                tables = self._tables
                needed = TablesSize(
                    tables.slots * 2 if not self._free else tables.slots,
                    _round_up(task.prefix_len, PREFIX_STEP),
                    _round_up(task.num_classes, CLASSES_STEP),
                    _pool_rows(tables.prefix_rows, len(self._prefix_rows), task.prefix_len),
                    _pool_rows(tables.class_rows, len(self._class_rows), task.num_classes),
                )
            grown = None
            if needed.at_least(tables.size) != tables.size:
                grown = tables.grown(self.backbone, needed)
                for listener in self._listeners:  # outside the lock: forwards go on meanwhile
                    listener(grown)
            with self._lock:
                tasks = dict(self._snapshot.tasks)
                if grown is not None:
                    self._free.extend(range(tables.slots, grown.slots))
                    self._prefix_rows.give(range(tables.prefix_rows, grown.prefix_rows))
                    self._class_rows.give(range(tables.class_rows, grown.class_rows))
                    self._tables = grown
                slot = min(self._free)  # lowest first keeps the tables dense
                self._free.remove(slot)
                rows = SlotRows(
                    self._prefix_rows.take(task.prefix_len), self._class_rows.take(task.num_classes)
                )
                self._rows[slot] = rows
                self._tables.write(slot, rows, task)
                version = self._versions.get(task.task_id, 0) + (
                    new_version or task.task_id not in self._versions
                )
                self._versions[task.task_id] = version
                entry = TaskEntry(
                    task_id=task.task_id,
                    version=version,
                    slot=slot,
                    info=task.info,
                    prefix_len=task.prefix_len,
                    num_classes=task.num_classes,
                    nbytes=self.entry_bytes(task),
                    loaded_at=time.time(),
                    load_seconds=time.perf_counter() - started,
                )
                previous = tasks.get(task.task_id)
                tasks[task.task_id] = entry
                generation = self._snapshot.generation + 1
                if previous is not None:
                    self._leases.freed.append((generation, previous.slot))
                self._publish(tasks, generation)
        return entry

    def remove(self, task_id: str) -> TaskEntry:
        """Unload a task; forwards already holding a snapshot, and requests holding it, still finish."""
        entry = self._remove(task_id, only_idle=False)
        assert entry is not None
        return entry

    def evict(self, task_id: str) -> TaskEntry | None:
        """Unload a task unless a request holds it (then ``None``): what a cache may drop.

        A forward already running keeps its snapshot; a queued request holds its entry, so a task
        some queued request still needs is never evicted.
        """
        return self._remove(task_id, only_idle=True)

    def _remove(self, task_id: str, only_idle: bool) -> TaskEntry | None:
        with self._writing, self._lock:
            tasks = dict(self._snapshot.tasks)
            if task_id not in tasks:
                raise UnknownTaskError(task_id)
            if only_idle and tasks[task_id].slot in self._leases.held:
                return None
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
        admitted under even if the task is replaced, evicted or unloaded while it waits.
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

    def entry_bytes(self, task: PreparedTask) -> int:
        """What ``task`` would hold in these tables: its exact compiled size at the backbone's dtype."""
        return compiled_nbytes(self.backbone.spec, self.backbone.dtype, task.prefix_len, task.num_classes)

    def memory(self) -> dict[str, int]:
        """Bytes per resident task (its exact compiled size), plus the tables' allocated total (free
        rows and slots, page tables and rows still read by older snapshots included)."""
        snapshot = self._snapshot
        report = {task_id: entry.nbytes for task_id, entry in snapshot.tasks.items()}
        report["__tables_allocated__"] = snapshot.tables.nbytes
        return report
